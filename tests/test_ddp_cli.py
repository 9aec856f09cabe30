"""Every method's quickstart trains 2 steps through the CLI with 2 CPU processes (DDP, gloo).

The command line is the documented one (``python -m lightning_mim fit --config configs/quickstart/...``) with
``--trainer.devices 2 --trainer.strategy ddp``: Lightning relaunches the same command line for rank 1, so this
checks that the quickstarts, their callbacks (OnlineKNN, VisualDiagnostics, ModelCheckpoint) and bf16 autocast
run under DDP, and that rank 0 writes a loadable checkpoint.

That the ranks keep identical teachers (ConMIM's EMA teacher, CMAE's target encoder, MoCo v3's momentum
encoder, the VQ tokenizer's EMA codebook) is checked by ``tests/test_ddp.py::test_ddp_teacher_identical_and_knn_exact``
with a worker that reads every rank's teacher: the CLI adds nothing to that code path, so it is not repeated here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart"

# The pre-training quickstarts; stage 2 / CIM get a random teacher / tokenizer instead of stage 1's checkpoint.
METHODS: dict[str, list[str]] = {
    "conmim": [],
    "cmae": [],
    "mocov3": [],
    "mimco": ["--model.teacher_ckpt", "null", "--model.allow_random_teacher", "true"],
    "vq_tokenizer": [],
    "cim": ["--model.tokenizer_ckpt", "null", "--model.allow_random_tokenizer", "true"],
}


def ddp_env() -> dict[str, str]:
    """The caller's environment without a surrounding launcher's variables, one thread per process."""
    launcher = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


# ConMIM (EMA teacher, kNN, diagnostics) and CIM (frozen tokenizer, generator) in the default suite; the
# other quickstarts run the same CLI path and are checked with the slow tests (about 12 s each).
DEFAULT_SUITE = ("conmim", "cim")


@pytest.mark.parametrize(
    "method", [m if m in DEFAULT_SUITE else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_quickstart_trains_two_steps_on_two_ddp_processes(method: str, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "lightning_mim", "fit", "--config", str(QUICKSTART / f"{method}.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.default_root_dir", "run",
        "--data.train_size", "64", "--data.val_size", "16", "--data.batch_size", "8", "--data.num_workers", "0",
        *METHODS[method],
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ddp_env(), timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in log
    checkpoints = list(tmp_path.rglob("last.ckpt"))  # rank 0 writes it; where depends on the config's dirpath
    assert len(checkpoints) == 1, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.ckpt"))
    ckpt = torch.load(checkpoints[0], weights_only=True)
    assert ckpt["global_step"] == 2
    weights = {k: v for k, v in ckpt["state_dict"].items() if v.is_floating_point()}
    assert weights
    assert all(torch.isfinite(v).all() for v in weights.values()), [
        k for k, v in weights.items() if not torch.isfinite(v).all()
    ]
