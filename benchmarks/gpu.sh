#!/usr/bin/env bash
# One command for a GPU machine: benchmarks/step.py for every method at ViT-B/16 224 bf16, eager and
# compiled, one table. About 5 minutes on an H100/H200. Run from the repository root:
#   bash benchmarks/gpu.sh [BATCH]        (default batch 64 per GPU)
set -euo pipefail
batch="${1:-64}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
printf "%-8s %-8s %10s %10s %10s %8s %8s %14s\n" method compile ms/step img/s floor_ms ratio MFU memory
for method in conmim cmae mae mimco cim; do
  for compile in "" "--compile"; do
    out=$(python benchmarks/step.py --method "$method" --arch vit_base --batch "$batch" \
      --precision bf16-mixed --steps 10 --warmup 3 $compile 2>/dev/null)
    ours=$(sed -n 's/.*: ours \([0-9.]*\) ms\/step (\([0-9.]*\) img\/s).*/\1 \2/p' <<<"$out")
    floor=$(sed -n 's/^floor.*: \([0-9.]*\) ms\/step.*/\1/p' <<<"$out")
    ratio=$(sed -n 's/^ours\/floor = \([0-9.]*\)/\1/p' <<<"$out")
    mfu=$(sed -n 's/^MFU: \([0-9.]*%\).*/\1/p' <<<"$out")
    mem=$(sed -n 's/^peak memory: \([0-9.]* GiB\).*/\1/p' <<<"$out")
    printf "%-8s %-8s %10s %10s %10s %8s %8s %14s\n" "$method" "${compile:-no}" $ours "$floor" "$ratio" "$mfu" "$mem"
  done
done
