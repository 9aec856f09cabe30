"""The full quickstart, exactly as the README runs it: it must finish in time and learn."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_learns_within_seven_minutes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lightning_mim", "fit", "--config", str(ROOT / "configs/quickstart/conmim.yaml")]
    start = time.perf_counter()
    result = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"}
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = next((tmp_path / "runs/quickstart/conmim/csv").glob("version_*/metrics.csv"))
    knn = [float(row["val/knn_top1"]) for row in csv.DictReader(metrics.open()) if row.get("val/knn_top1")]
    checkpoints = list((tmp_path / "runs/quickstart/conmim").rglob("*.ckpt"))
    print(f"quickstart: {elapsed:.0f} s, kNN top-1 {knn}")
    # One kNN evaluation (1,000 fixed query images) moves by about 1.5 points between training seeds,
    # so the check averages the last two evaluations (steps 750 and 1,000) and compares them with the
    # one before training. Measured on a 2-core EPYC for seeds 0 / 1 / 2: +2.45 / +3.25 / +3.1 points;
    # an encoder that does not learn gives 0, one that degrades gives less (the official BEiT init,
    # too slow a start for 1,000 steps at this size, gave +0.7 on seed 0).
    # The time bound is loose: the same run took 252-362 s on the shared 2-core machine in one day
    # (benchmarks/step.py measures speed; this only catches a run that has become far slower).
    assert len(knn) == 5, f"expected kNN at steps 0, 250, 500, 750 and 1000, got {knn}"
    late = sum(knn[-2:]) / 2
    assert late >= knn[0] + 2.0, f"kNN top-1 went from {knn[0]} to {knn[-2:]} (mean {late:.2f})"
    assert elapsed < 420, f"quickstart took {elapsed:.0f} s"
    assert checkpoints, "no checkpoint written"
    assert list((tmp_path / "runs/quickstart/conmim/wandb").glob("offline-run-*")), "no offline wandb run"
