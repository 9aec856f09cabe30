"""FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes: the same training as DDP, EMA teacher included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_mim.export import create_model, to_timm

WORKER = Path(__file__).with_name("fsdp_worker.py")


STRATEGIES = ("ddp", "fsdp", "fsdp_checkpointing")  # FSDP2 with activation checkpointing of the student


def test_sharded_student_and_teacher_train_exactly_as_ddp(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(WORKER), ",".join(STRATEGIES), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ddp, fsdp, checkpointed = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in STRATEGIES)
    assert fsdp["sharded"] == ["DTensor"] and ddp["sharded"] == ["Parameter"]
    for run in (fsdp, checkpointed):
        for part in ("student", "teacher"):
            assert run[part].keys() == ddp[part].keys()
            for name, value in ddp[part].items():
                torch.testing.assert_close(run[part][name], value, atol=1e-6, rtol=0, msg=f"{part}.{name}")
    # the EMA teacher is not the student: it moved by EMA, identically under both strategies
    assert any(not torch.equal(ddp["teacher"][n], ddp["student"][n]) for n in ddp["teacher"])
    assert fsdp["knn"] == ddp["knn"]  # kNN features through gathered() on the sharded teacher
    # the checkpoint holds full tensors: export works from it as from a DDP checkpoint
    exported = create_model(to_timm(tmp_path / "fsdp.ckpt", tmp_path / "export"))
    reference = create_model(to_timm(tmp_path / "ddp.ckpt", tmp_path / "export_ddp"))
    for (name, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
