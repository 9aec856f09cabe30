"""Preemption: on SIGTERM / SIGUSR1, write a resumable checkpoint at the next step boundary and stop."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

__all__ = ["Preemption"]


class Preemption(Callback):
    """Writes ``last.ckpt`` and stops cleanly when the job is told to stop; resume with ``--ckpt_path last``.

    Clusters stop jobs with a signal: SLURM sends SIGTERM before killing a preempted or timed-out job,
    and SIGUSR1 ahead of the time limit when the job asks for it (``#SBATCH --signal=USR1@120``);
    Kubernetes and torchrun send SIGTERM. On any of ``signals`` this callback lets the current
    optimizer step finish, writes a checkpoint with everything a resumed run needs (weights, teacher,
    optimizer and schedule, callback states, random streams, the data position mid-epoch), and ends
    the run. Under SLURM (``SLURM_JOB_ID`` set) with ``requeue=True`` it then requeues the job, whose
    script resumes with ``--ckpt_path last``.

    Signals only set a flag: the checkpoint is written between steps, through Lightning's own SIGTERM
    path (``Trainer.received_sigterm``, shared by every rank under DDP), never in the middle of an
    update. Lightning's SLURM handler for SIGUSR1, which saves ``hpc_ckpt_*.ckpt`` from inside the
    signal handler, is replaced while this callback is active.

    Args:
        signals: Names of the signals that stop the run.
        requeue: Under SLURM, requeue the job after the checkpoint is written.
        filename: Checkpoint file name, written to the ModelCheckpoint's folder (or to
            ``<default_root_dir>/checkpoints`` without one). ``last.ckpt`` is what ``--ckpt_path last``
            finds.

    Example::

        trainer = pl.Trainer(callbacks=[ModelCheckpoint(save_last=True), Preemption()])
        trainer.fit(model, data)                      # killed with SIGTERM: writes last.ckpt, exits
        trainer.fit(model, data, ckpt_path="last")    # the next job continues exactly where it stopped
    """

    def __init__(
        self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True, filename: str = "last.ckpt"
    ) -> None:
        self.signals = tuple(_signal(name) for name in signals)
        self.requeue = requeue
        self.filename = filename
        self.received: signal.Signals | None = None
        self.checkpoint_path: Path | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has registered its SIGTERM handler by now; ours records the signal and then runs it.
        self.received = None
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        lightning_sigterm = self._previous.get(signal.SIGTERM) or signal.getsignal(signal.SIGTERM)
        if callable(lightning_sigterm) and lightning_sigterm is not self._handle:
            lightning_sigterm(signal.SIGTERM, frame)  # sets trainer.received_sigterm: stop after this step

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self._path(trainer)
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        name = self.received.name if self.received is not None else "SIGTERM"
        rank_zero_info(
            f"{name} received: checkpoint of step {trainer.global_step} written to {path}; "
            "resume with `--ckpt_path last` (or `trainer.fit(..., ckpt_path='last')`)"
        )
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
            job = f"{array_job}_{task}" if array_job and task else job
            result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"requeued SLURM job {job}")
            else:
                rank_zero_warn(f"could not requeue SLURM job {job}: {result.stderr.strip()}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _path(self, trainer: pl.Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None:
            return Path(checkpoint.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[name.upper()]
    except KeyError:
        raise ValueError(f"Preemption: unknown signal {name!r}; use names such as 'SIGTERM', 'SIGUSR1'") from None
