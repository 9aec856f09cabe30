"""Optimiser set-up shared by all methods: parameter groups, lr scaling and the lr schedule.

A method module holds an :class:`OptimConfig` and returns ``configure_adamw(self, params_owner,
config)`` from ``configure_optimizers``. Parameter groups come from timm's helpers; the schedule is
a per-optimizer-step linear warmup from 0 followed by a cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

__all__ = [
    "OptimConfig",
    "configure_adamw",
    "global_batch_size",
    "no_weight_decay_names",
    "param_groups",
    "scaled_lr",
    "warmup_cosine",
]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, stepped per optimizer step.

    Attributes:
        lr: Peak learning rate; with ``base_batch_size`` set it is the lr *per* ``base_batch_size``
            images and is scaled by ``global_batch / base_batch_size`` (the MAE/MoCo v3 rule).
        base_batch_size: Reference batch of the linear scaling rule; None uses ``lr`` as given.
        min_lr: Final learning rate of the cosine decay (scaled like ``lr`` when scaling is on).
        weight_decay: Decoupled weight decay, not applied to biases, 1-D parameters (norms),
            position embeddings, class/mask tokens and relative-position tables.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_epochs: Linear warmup length in epochs (converted to optimizer steps).
        warmup_steps: Warmup length in optimizer steps; overrides ``warmup_epochs`` when set.
        layer_decay: Layer-wise lr decay factor (timm's helper); needs a timm model with a
            ``group_matcher``. None disables it.
    """

    lr: float = 5e-4
    base_batch_size: int | None = None
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.base_batch_size is not None and self.base_batch_size <= 0:
            raise ValueError(f"base_batch_size must be positive, got {self.base_batch_size}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError("warmup_epochs and warmup_steps must be >= 0")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that submodules exempt from weight decay via ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names |= {f"{prefix}.{n}" if prefix else n for n in hook()}
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters.

    No weight decay on 1-D parameters, biases and whatever the submodules' ``no_weight_decay()``
    name (timm: position embeddings, class token, relative position tables; ``MaskedViT``: the mask
    token). With ``layer_decay``, groups carry an ``lr_scale`` from timm's layer-wise decay.
    """
    skip = no_weight_decay_names(model)
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    else:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"layer_decay needs a model with timm's group_matcher(); {type(model).__name__} has none")
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return [g for g in groups if g["params"]]


def scaled_lr(lr: float, global_batch: int, base_batch_size: int | None) -> float:
    """The linear scaling rule: ``lr * global_batch / base_batch_size`` (``lr`` when no base)."""
    return lr if base_batch_size is None else lr * global_batch / base_batch_size


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear 0 -> 1 over ``warmup_steps``, then cosine to ``final_ratio``."""
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch_size(trainer: pl.Trainer) -> int:
    """Images per optimizer step over all ranks: per-device batch x devices x accumulation."""
    per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if per_device is None:
        raise ValueError("lr scaling (base_batch_size) needs a datamodule with a `batch_size` attribute")
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def _warmup_steps(trainer: pl.Trainer, config: OptimConfig) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    if config.warmup_epochs == 0:
        return 0
    batches = trainer.num_training_batches
    if not math.isfinite(batches) and trainer.train_dataloader is None:
        # A step-limited run (max_epochs=-1) has not loaded its dataloader yet; Lightning's own
        # estimated_stepping_batches loads it the same way.
        trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError("warmup_epochs needs a sized train dataloader; set warmup_steps instead")
    steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    return round(config.warmup_epochs * steps_per_epoch)


def peak_lr(module: pl.LightningModule, config: OptimConfig) -> float:
    """The peak learning rate of ``config`` for ``module``'s run (scaled by the global batch if asked)."""
    global_batch = global_batch_size(module.trainer) if config.base_batch_size is not None else 0
    return scaled_lr(config.lr, global_batch, config.base_batch_size)


def with_schedule(
    module: pl.LightningModule, optimizer: torch.optim.Optimizer, config: OptimConfig
) -> OptimizerLRSchedulerConfig:
    """``optimizer`` (its groups' ``lr`` set to their peak values) with the per-step warmup-cosine schedule.

    The schedule length is ``trainer.estimated_stepping_batches`` (optimizer steps, so gradient
    accumulation is accounted for); the final lr is ``min_lr`` scaled like the peak.
    """
    trainer = module.trainer
    total_steps = int(trainer.estimated_stepping_batches)  # also sets num_training_batches
    warmup = min(_warmup_steps(trainer, config), total_steps)
    final_ratio = config.min_lr / config.lr
    factor = partial(warmup_cosine, total_steps=total_steps, warmup_steps=warmup, final_ratio=final_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def configure_adamw(module: pl.LightningModule, model: nn.Module, config: OptimConfig) -> OptimizerLRSchedulerConfig:
    """AdamW over ``model``'s trainable parameters with the warmup-cosine schedule, for Lightning.

    Call from ``configure_optimizers``. Weight-decay rules and layer decay as in :func:`param_groups`;
    the CUDA fused kernel is used when every parameter is on a GPU.
    """
    peak = peak_lr(module, config)
    groups = param_groups(model, config.weight_decay, config.layer_decay)
    for group in groups:
        group["lr"] = peak * group.pop("lr_scale", 1.0)
    on_gpu = all(p.is_cuda for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=config.betas, eps=config.eps, fused=on_gpu or None)
    return with_schedule(module, optimizer, config)
