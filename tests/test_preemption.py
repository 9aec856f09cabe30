"""Preemption (SIGTERM / SIGUSR1) and crash-safe checkpoint writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_mim.callbacks import Preemption
from lightning_mim.checkpoint.io import AtomicCheckpointIO
from lightning_mim.data import SampleDataModule
from tests.helpers import cpu_trainer, tiny_method

ROOT = Path(__file__).resolve().parents[1]


class _SignalAt(pl.Callback):
    """Sends ``sig`` to this process during optimizer step ``at`` (as a scheduler would, mid-step)."""

    def __init__(self, sig: signal.Signals, at: int) -> None:
        self.sig, self.at = sig, at

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.sig)


def _fit(tmp: Path, callbacks: list[pl.Callback], ckpt_path: str | None = None) -> pl.LightningModule:
    pl.seed_everything(5)
    module, _ = tiny_method("conmim", drop_path=0.1)
    data = SampleDataModule(batch_size=8, num_workers=0, train_size=48, val_size=8)  # 6 steps per epoch
    trainer = cpu_trainer(
        max_epochs=2,
        limit_val_batches=0,
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp, save_last=True, save_on_train_epoch_end=True), *callbacks],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_writes_a_checkpoint_and_the_run_resumes_exactly(sig: signal.Signals, tmp_path: Path) -> None:
    reference = _fit(tmp_path / "a", [])
    before = signal.getsignal(sig)
    preemption = Preemption()
    with pytest.raises(SIGTERMException):
        _fit(tmp_path / "b", [preemption, _SignalAt(sig, at=3)])  # mid-epoch 0, during step 4's update
    assert signal.getsignal(sig) == before  # handlers restored
    assert preemption.received == sig
    last = tmp_path / "b" / "last.ckpt"
    assert preemption.checkpoint_path == last
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4  # the step in flight finished, then the run stopped
    assert state["SampleDataModule"]["batches_done"] == 4
    resumed = _fit(tmp_path / "b", [Preemption()], ckpt_path=str(last))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_unknown_signal_name() -> None:
    with pytest.raises(ValueError, match="SIGNOPE"):
        Preemption(signals=("SIGNOPE",))


def test_cli_run_signalled_from_outside_resumes_with_ckpt_path_last(tmp_path: Path) -> None:
    """`lightning-mim fit` in a subprocess, SIGTERM from the parent mid-run, then `--ckpt_path last`."""

    def command(max_steps: int) -> list[str]:
        return [
            sys.executable, "-m", "lightning_mim", "fit", "--config", str(ROOT / "configs/quickstart/conmim.yaml"),
            "--trainer.max_steps", str(max_steps), "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false",
            "--data.train_size", "128", "--data.val_size", "16", "--data.batch_size", "16", "--data.num_workers", "1",
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command(100_000), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # OnlineKNN reports at the first step: training is under way
        lines.append(line)
        if "OnlineKNN: step 0" in line:
            break
    time.sleep(3.0)  # some dozens of steps into the run
    assert process.poll() is None, "".join(lines)[-3000:]
    checkpoints = tmp_path / "runs/quickstart/conmim/checkpoints"
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    assert "SIGTERM received: checkpoint of step" in output
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped_at < 100_000

    resumed = subprocess.run(
        [*command(stopped_at + 4), "--ckpt_path", "last"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last.ckpt'}" in resumed.stderr
    assert f"`max_steps={stopped_at + 4}` reached" in resumed.stderr  # 4 more steps, not {stopped_at + 4}
    assert "Restored all states from the checkpoint" in resumed.stderr


def test_atomic_write_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def crash(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # the process dies in the middle of the write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"] == 1  # the good one is intact
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind
    io.save_checkpoint({"step": 3}, target)
    assert io.load_checkpoint(target)["step"] == 3


def test_checkpoint_io_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
