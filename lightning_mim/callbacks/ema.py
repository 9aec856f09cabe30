"""EMA teacher (momentum encoder) callback."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["EMATeacher", "cosine_momentum"]


def cosine_momentum(step: int, total_steps: int, base: float, final: float) -> float:
    """``final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``: ``base`` at step 0, ``final`` at the end."""
    if total_steps <= 0:
        return final
    progress = min(1.0, step / total_steps)
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _get_module(root: nn.Module, path: str) -> nn.Module:
    module: Any = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"EMATeacher: {type(root).__name__} has no attribute path {path!r} (missing {part!r})")
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise TypeError(f"EMATeacher: {path!r} is a {type(module).__name__}, not an nn.Module")
    return module


def _match_parameters(pairs: list[tuple[nn.Module, nn.Module]]) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher and student parameters matched by name, teacher first."""
    teacher_params: list[Tensor] = []
    student_params: list[Tensor] = []
    for student, teacher in pairs:
        student_named = dict(student.named_parameters())
        for name, t_param in teacher.named_parameters():
            s_param = student_named.get(name)
            if s_param is None:
                raise ValueError(f"EMATeacher: teacher parameter {name!r} has no student counterpart")
            if s_param.shape != t_param.shape:
                raise ValueError(
                    f"EMATeacher: shape mismatch for {name!r}: student {tuple(s_param.shape)}, "
                    f"teacher {tuple(t_param.shape)}"
                )
            if t_param.requires_grad:
                raise ValueError(
                    f"EMATeacher: teacher parameter {name!r} requires grad; freeze the teacher "
                    "(teacher.requires_grad_(False)) and keep it out of the optimizer"
                )
            teacher_params.append(t_param)
            student_params.append(s_param)
    if not teacher_params:
        raise ValueError("EMATeacher: the teacher has no parameters")
    return teacher_params, student_params


class EMATeacher(Callback):
    """Keeps a teacher as an exponential moving average of a student (a momentum encoder).

    After every *optimizer* step (not every micro-batch, so gradient accumulation is respected)::

        teacher <- m * teacher + (1 - m) * student

    for every teacher parameter, matched to the student parameter of the same name. ``m`` follows a
    cosine schedule from ``momentum`` to ``final_momentum`` over ``trainer.estimated_stepping_batches``
    optimizer steps (BYOL, DINO, ConMIM), or stays at ``momentum`` with ``schedule="constant"`` or
    when both are equal. The update is one fused ``torch._foreach_lerp_`` over all parameters.
    Buffers (BatchNorm running statistics) are not averaged.

    Which modules are paired: if the LightningModule defines ``momentum_pairs()``, returning an
    iterable of ``(student, teacher)`` module pairs, those are used; otherwise the attributes named by
    ``student`` and ``teacher`` (dotted paths allowed, e.g. ``"model.encoder"``). The teacher may lack
    some student parameters (e.g. a head it does not have); every teacher parameter needs a student
    counterpart of the same shape. Teacher parameters must not require grad.

    Works with any LightningModule. Under DDP every rank applies the same update to identical
    students, so teachers stay identical across ranks. The position in the schedule is saved in
    checkpoints. The current momentum is logged as ``train/ema_momentum``.

    Example::

        trainer = Trainer(callbacks=[EMATeacher("encoder", "momentum_encoder", momentum=0.99)])

    Args:
        student: Attribute path of the student module.
        teacher: Attribute path of the teacher module.
        momentum: Momentum at the first step.
        final_momentum: Momentum at the last step.
        schedule: ``"cosine"`` or ``"constant"``.
        log: Log ``train/ema_momentum`` every step.
    """

    def __init__(
        self,
        student: str = "student",
        teacher: str = "teacher",
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        schedule: Literal["cosine", "constant"] = "cosine",
        log: bool = True,
    ) -> None:
        if not (0.0 <= momentum <= 1.0 and 0.0 <= final_momentum <= 1.0):
            raise ValueError(f"momenta must be in [0, 1], got {momentum} and {final_momentum}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        self.student = student
        self.teacher = teacher
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.schedule = schedule
        self.log = log
        self._latest_update_step = 0
        self._total_steps = 0
        self._teacher_params: list[Tensor] = []
        self._student_params: list[Tensor] = []

    def current_momentum(self, step: int) -> float:
        """Momentum applied after optimizer step ``step`` (0-based)."""
        if self.schedule == "constant" or self.momentum == self.final_momentum:
            return self.momentum
        return cosine_momentum(step, self._total_steps, self.momentum, self.final_momentum)

    def _pairs(self, pl_module: pl.LightningModule) -> list[tuple[nn.Module, nn.Module]]:
        hook = getattr(pl_module, "momentum_pairs", None)
        if callable(hook):
            return list(hook())
        return [(_get_module(pl_module, self.student), _get_module(pl_module, self.teacher))]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teacher_params, self._student_params = _match_parameters(self._pairs(pl_module))
        self._total_steps = int(trainer.estimated_stepping_batches)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # trainer.global_step counts optimizer steps: it moves only on the micro-batch that ends an
        # accumulation window (and not at all for a skipped step), so compare it with our last update.
        if trainer.global_step <= self._latest_update_step:
            return
        step = trainer.global_step - 1  # 0-based index of the optimizer step just taken
        momentum = self.current_momentum(step)
        with torch.no_grad():
            torch._foreach_lerp_(self._teacher_params, self._student_params, 1.0 - momentum)
        self._latest_update_step = trainer.global_step
        if self.log:
            pl_module.log("train/ema_momentum", momentum, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self._latest_update_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = int(state_dict["latest_update_step"])
