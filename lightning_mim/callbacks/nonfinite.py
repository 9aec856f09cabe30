"""NonFiniteGuard: stop (or skip the step) when a loss becomes NaN or infinite, naming the step and the term."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A training loss term became NaN or infinite."""


class NonFiniteGuard(Callback):
    """Watches the training loss and every logged ``train/*`` term for NaN / inf.

    ``mode="raise"`` (default) stops the run with :class:`NonFiniteLossError` naming the first step at
    which each term went non-finite. To stay free of per-step host synchronisation it records those
    steps on the device and reads them every ``check_every_n_steps`` optimizer steps (default: the
    Trainer's ``log_every_n_steps``, where logging synchronises anyway), at the end of training and
    before every checkpoint is written: a checkpoint of non-finite weights is never written, so the
    last good ``last.ckpt`` stays on disk.

    ``mode="skip"`` checks the loss of every micro-batch (one host sync per step) and, when one is
    not finite, drops the gradients of that optimizer step (an optimizer skips parameters without a
    gradient: no update, no weight decay, no moment update), warns with the step and the terms, and
    counts it in ``skipped_steps`` (logged as ``train/skipped_steps``). After ``max_skipped`` skipped
    steps it raises, since a run that keeps producing NaNs is broken, not unlucky.

    Args:
        mode: ``"raise"`` or ``"skip"``.
        check_every_n_steps: How often ``"raise"`` mode reads the recorded flags (None: the Trainer's
            ``log_every_n_steps``).
        max_skipped: Most steps ``"skip"`` mode may skip before raising.

    Example::

        trainer = pl.Trainer(callbacks=[NonFiniteGuard()])             # stop, name the step and term
        trainer = pl.Trainer(callbacks=[NonFiniteGuard(mode="skip")])  # skip such steps, count them
    """

    def __init__(self, mode: str = "raise", check_every_n_steps: int | None = None, max_skipped: int = 100) -> None:
        if mode not in ("raise", "skip"):
            raise ValueError(f"NonFiniteGuard(mode={mode!r}): use 'raise' or 'skip'")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"NonFiniteGuard(check_every_n_steps={check_every_n_steps}): must be >= 1")
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self.max_skipped = max_skipped
        self.skipped_steps = 0
        self._first_bad: dict[str, Tensor] = {}  # term -> first non-finite step (-1: none), on the device
        self._bad_in_step = False
        self._step = 0

    # ------------------------------------------------------------------------- raise mode
    def _record(self, name: str, value: Tensor) -> None:
        first = self._first_bad.get(name)
        if first is None:
            first = self._first_bad[name] = torch.full((), -1, dtype=torch.long, device=value.device)
        bad = ~torch.isfinite(value.detach()).all()
        first.copy_(torch.where(bad & (first < 0), self._step, first))  # device ops only

    def _check(self, trainer: pl.Trainer, when: str) -> None:
        if not self._first_bad:
            return
        names = list(self._first_bad)
        steps = torch.stack([self._first_bad[name].to("cpu") for name in names]).tolist()  # the one sync
        bad = sorted((step, name) for name, step in zip(names, steps, strict=True) if step >= 0)
        if not bad:
            return
        first_step = bad[0][0]
        terms = ", ".join(f"{name} (first at step {step})" for step, name in bad)
        raise NonFiniteLossError(
            f"non-finite training loss at step {first_step}: {terms}. Stopped {when}; no checkpoint of the "
            "non-finite weights was written, so the last checkpoint on disk is the last good one. Usual causes: "
            "a learning rate too high for the batch size, fp16 overflow (use bf16-mixed), a bad input batch. "
            "NonFiniteGuard(mode='skip') skips such steps instead."
        )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._step = trainer.global_step  # optimizer steps completed before this one
        if self.mode == "raise":
            self._record("loss", loss)
        elif not bool(torch.isfinite(loss.detach()).all()):  # skip mode: one sync per micro-batch
            self._bad_in_step = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.mode != "raise":
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/") and isinstance(value, Tensor) and value.is_floating_point():
                self._record(name, value)
        every = self.check_every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 1
        if trainer.global_step % every == 0:
            self._check(trainer, f"at the check of step {trainer.global_step}")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.mode == "raise":
            self._check(trainer, "before writing a checkpoint")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "raise":
            self._check(trainer, "at the end of training")

    # -------------------------------------------------------------------------- skip mode
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.mode != "skip" or not self._bad_in_step:
            return
        self._bad_in_step = False
        optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left as they are
        self.skipped_steps += 1
        terms = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        rank_zero_warn(
            f"NonFiniteGuard: non-finite loss at step {trainer.global_step} ({terms}); "
            f"step skipped ({self.skipped_steps} so far)"
        )
        pl_module.log("train/skipped_steps", float(self.skipped_steps), rank_zero_only=True)
        if self.skipped_steps > self.max_skipped:
            raise NonFiniteLossError(
                f"non-finite training loss at step {trainer.global_step}: {self.skipped_steps} steps skipped, "
                f"more than max_skipped={self.max_skipped}; the run is diverging"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
