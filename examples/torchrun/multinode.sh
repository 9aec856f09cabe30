#!/usr/bin/env bash
# ConMIM ViT-B/16 on several nodes with torchrun, without SLURM: run this script on every node, from the
# repository root on a file system every node sees (runs/conmim_vitb/checkpoints is relative to it).
#
#   NNODES=4 RDZV_HOST=node0.example.org bash examples/torchrun/multinode.sh /data/imagenet [overrides...]
#
# The nodes meet at a c10d rendezvous hosted by the torchrun agent on RDZV_HOST (start it there too;
# the others wait for it) and number themselves 0..NNODES-1; each starts GPUS_PER_NODE processes.
# Lightning detects TorchElasticEnvironment and takes the ranks from torchrun; it checks that
# trainer.num_nodes x trainer.devices equals the world size. 4 nodes x 8 GPUs x 64 images = 2048.
#
# Stopping: send SIGTERM to torchrun on every node (as schedulers do; what counts is global rank 0's
# node, whose decision Lightning shares with all ranks). torchrun passes it to the training processes,
# which write last.ckpt at the next step boundary (lightning_mim.callbacks.Preemption) and exit; it
# kills them 30 s later. SIGUSR1 is not passed on by default. Running this script again resumes
# (`--ckpt_path last`). --max-restarts: after a failed process torchrun restarts the processes of
# every node, which resume from last.ckpt in the same way.
set -euo pipefail

DATA=${1:?usage: multinode.sh DATA_ROOT [lightning-mim overrides...]}
shift
NNODES=${NNODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST to the host name of one of the nodes}
RDZV_PORT=${RDZV_PORT:-29400}
RUN_ID=${RUN_ID:-conmim_vitb}  # the same on every node; a new one for an unrelated run

exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --max-restarts 3 \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RUN_ID" \
  -m lightning_mim fit --config configs/conmim_vitb.yaml \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" --data.root "$DATA" --ckpt_path last "$@"
