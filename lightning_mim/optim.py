"""Optimiser set-up shared by all methods: parameter groups, lr scaling and the lr schedule.

A method module holds an :class:`OptimConfig` and returns ``configure_adamw(self, params_owner,
config)`` from ``configure_optimizers``. Which parameters take weight decay is a declared
:class:`WeightDecayRule` of each method (its official rule by default); layer-wise lr decay comes
from timm; the schedule is a per-optimizer-step linear warmup from 0 followed by a cosine decay to
``min_lr``. A recipe may state the global batch it reproduces (``recipe_batch_size``): a run at
another batch warns once at the start, naming the flag that restores it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

__all__ = [
    "DECAY_ALL",
    "TIMM_DECAY_RULE",
    "OptimConfig",
    "WeightDecayRule",
    "check_recipe_batch",
    "configure_adamw",
    "global_batch_size",
    "no_weight_decay_names",
    "optim_config",
    "param_groups",
    "scaled_lr",
    "warmup_cosine",
]


@dataclass(frozen=True)
class WeightDecayRule:
    """Which trainable parameters take no weight decay: those that match any of the enabled tests.

    Official code bases differ here, and the difference changes what training produces, so every
    method declares its own rule (``OptimConfig.decay_rule``); ``exempt_names(model)`` lists what a
    rule exempts on a given model. Names are the model's own ``named_parameters()`` names.

    Attributes:
        one_dim: Exempt parameters with at most one dimension (norm weights and biases, layer
            scales, q/v biases).
        bias: Exempt parameters whose name ends in ``bias``.
        names: Exempt parameters whose last name component is one of these (``"cls_token"``
            matches ``encoder.vit.cls_token``).
        substrings: Exempt parameters whose full name contains one of these.
        module_hooks: Exempt what submodules list in timm's ``no_weight_decay()`` protocol (timm:
            position embeddings, class token, relative position tables; ``MaskedViT`` and
            ``MAEDecoder``: their mask tokens).
    """

    one_dim: bool = True
    bias: bool = True
    names: tuple[str, ...] = ()
    substrings: tuple[str, ...] = ()
    module_hooks: bool = True

    def exempt_names(self, model: nn.Module) -> set[str]:
        """Full names of the trainable parameters of ``model`` that this rule exempts from weight decay."""
        hooked = no_weight_decay_names(model) if self.module_hooks else set()
        exempt = set()
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if (
                (self.one_dim and param.ndim <= 1)
                or (self.bias and name.endswith("bias"))
                or name.rpartition(".")[2] in self.names
                or any(part in name for part in self.substrings)
                or name in hooked
            ):
                exempt.add(name)
        return exempt


#: timm's rule, and every method's before 0.2: 1-D parameters, biases and ``no_weight_decay()`` names.
#: The fine-tuning recipes of BEiT, MAE and ConMIM exempt the same parameters.
TIMM_DECAY_RULE = WeightDecayRule()
#: Weight decay on every trainable parameter (MoCo v3: ``AdamW(model.parameters(), weight_decay=0.1)``).
DECAY_ALL = WeightDecayRule(one_dim=False, bias=False, module_hooks=False)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, stepped per optimizer step.

    Attributes:
        lr: Peak learning rate; with ``base_batch_size`` set it is the lr *per* ``base_batch_size``
            images and is scaled by ``global_batch / base_batch_size`` (the MAE/MoCo v3 rule).
        base_batch_size: Reference batch of the linear scaling rule; None uses ``lr`` as given.
        min_lr: Final learning rate of the cosine decay (scaled like ``lr`` when scaling is on).
        weight_decay: Decoupled weight decay, applied to the parameters ``decay_rule`` does not exempt.
        decay_rule: Which parameters take no weight decay; each method's default is its official
            code's rule, the fallback is timm's (:data:`TIMM_DECAY_RULE`).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_epochs: Linear warmup length in epochs (converted to optimizer steps).
        warmup_steps: Warmup length in optimizer steps; overrides ``warmup_epochs`` when set.
        layer_decay: Layer-wise lr decay factor (timm's helper); needs a timm model with a
            ``group_matcher``. None disables it.
        recipe_batch_size: The global batch (images per optimizer step over all devices) that the
            recipe reproduces. A run at another global batch warns once at the start, naming both
            and the flag that restores it; None checks nothing.
    """

    lr: float = 5e-4
    base_batch_size: int | None = None
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    decay_rule: WeightDecayRule = field(default_factory=WeightDecayRule)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    layer_decay: float | None = None
    recipe_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.base_batch_size is not None and self.base_batch_size <= 0:
            raise ValueError(f"base_batch_size must be positive, got {self.base_batch_size}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError("warmup_epochs and warmup_steps must be >= 0")
        if self.recipe_batch_size is not None and self.recipe_batch_size <= 0:
            raise ValueError(f"recipe_batch_size must be positive, got {self.recipe_batch_size}")
        if isinstance(self.decay_rule, Mapping):  # a plain dict from checkpoint hyperparameters
            object.__setattr__(self, "decay_rule", _decay_rule(self.decay_rule))


def _plain_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Dataclass fields from their ``asdict`` / YAML form: lists become tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _decay_rule(fields: Mapping[str, Any]) -> WeightDecayRule:
    return WeightDecayRule(**_plain_fields(fields))


def optim_config(value: OptimConfig | Mapping[str, Any]) -> OptimConfig:
    """An :class:`OptimConfig` from itself or from its ``dataclasses.asdict`` form (checkpoint hyperparameters).

    Fields missing from an older checkpoint keep their defaults; lists become tuples.
    """
    if isinstance(value, OptimConfig):
        return value
    fields = _plain_fields(value)
    rule = fields.get("decay_rule")
    if isinstance(rule, Mapping):
        fields["decay_rule"] = _decay_rule(rule)
    return OptimConfig(**fields)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that submodules exempt from weight decay via ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names |= {f"{prefix}.{n}" if prefix else n for n in hook()}
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    rule: WeightDecayRule = TIMM_DECAY_RULE,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``model``'s trainable parameters.

    The parameters ``rule`` exempts get weight decay 0, the others ``weight_decay``. With
    ``layer_decay``, groups also carry an ``lr_scale`` from timm's layer-wise decay (one group per
    layer and decay class, in timm's order).
    """
    exempt = rule.exempt_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay is None:
        groups = [
            {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
            {"params": [p for n, p in named if n not in exempt], "weight_decay": weight_decay},
        ]
        return [g for g in groups if g["params"]]
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"layer_decay needs a model with timm's group_matcher(); {type(model).__name__} has none")
    # timm gives each parameter its layer's lr scale; which parameters decay is this rule's decision.
    # Groups are keyed and ordered as timm's own (one per layer and decay class, by first parameter).
    scales = {
        id(p): group["lr_scale"]
        for group in param_groups_layer_decay(model, layer_decay=layer_decay)
        for p in group["params"]
    }
    split: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in named:
        decays = name not in exempt
        key = (scales[id(param)], decays)
        if key not in split:
            split[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": key[0]}
        split[key]["params"].append(param)
    return list(split.values())


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


def _restoring_flag(trainer: pl.Trainer, per_device: int, recipe: int) -> str:
    """The command-line change that makes this run's global batch ``recipe``."""
    devices, nodes, accumulate = (
        trainer.world_size // max(trainer.num_nodes, 1),
        trainer.num_nodes,
        trainer.accumulate_grad_batches,
    )
    current = per_device * devices * nodes * accumulate
    if recipe % current == 0:
        factor = recipe // current
        return (
            f"--trainer.num_nodes {nodes * factor} (more nodes) or --trainer.accumulate_grad_batches "
            f"{accumulate * factor} (gradient accumulation: the same images per update, but contrastive "
            "losses then see one micro-batch's negatives)"
        )
    if recipe % (devices * nodes * accumulate) == 0:
        return f"--data.batch_size {recipe // (devices * nodes * accumulate)} (images per device)"
    return "--data.batch_size, --trainer.devices, --trainer.num_nodes or --trainer.accumulate_grad_batches"


def check_recipe_batch(module: pl.LightningModule, config: OptimConfig) -> None:
    """Warns once if the run's global batch differs from the one ``config.recipe_batch_size`` reproduces.

    The warning names both batches, whether the lr follows the batch (``base_batch_size``) or not, and
    the flag that restores the recipe's batch. Nothing is checked when ``recipe_batch_size`` is None.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    recipe = config.recipe_batch_size
    if recipe is None:
        return
    trainer = module.trainer
    per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    owner = type(module).__name__
    if per_device is None:
        rank_zero_warn(
            f"{owner}: the recipe's global batch is {recipe} (optim.recipe_batch_size), but this run's "
            "data has no `batch_size` attribute to check it against"
        )
        return
    current = global_batch_size(trainer)
    if current == recipe:
        return
    devices = trainer.world_size // max(trainer.num_nodes, 1)
    lr_note = (
        f"the lr is scaled linearly to the batch (optim.base_batch_size {config.base_batch_size}), but batch "
        "statistics and the negatives of contrastive losses are not the recipe's"
        if config.base_batch_size is not None
        else f"the lr {config.lr:g} is absolute (not scaled to the batch), so this is not the recipe's training"
    )
    rank_zero_warn(
        f"{owner}: this run's global batch is {current} ({per_device} per device x {devices} devices x "
        f"{trainer.num_nodes} nodes x {trainer.accumulate_grad_batches} accumulated), the recipe's is {recipe} "
        f"(optim.recipe_batch_size); {lr_note}. To run the recipe's batch: "
        f"{_restoring_flag(trainer, int(per_device), recipe)}"
    )


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
    check_recipe_batch(module, config)
    total_steps = int(trainer.estimated_stepping_batches)  # also sets num_training_batches
    warmup = min(_warmup_steps(trainer, config), total_steps)
    final_ratio = config.min_lr / config.lr
    factor = partial(warmup_cosine, total_steps=total_steps, warmup_steps=warmup, final_ratio=final_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def configure_adamw(module: pl.LightningModule, model: nn.Module, config: OptimConfig) -> OptimizerLRSchedulerConfig:
    """AdamW over ``model``'s trainable parameters with the warmup-cosine schedule, for Lightning.

    Call from ``configure_optimizers``. Weight decay follows ``config.decay_rule`` and layer decay
    ``config.layer_decay`` (:func:`param_groups`); the CUDA fused kernel is used when every parameter
    is on a GPU.
    """
    peak = peak_lr(module, config)
    groups = param_groups(model, config.weight_decay, config.layer_decay, config.decay_rule)
    for group in groups:
        group["lr"] = peak * group.pop("lr_scale", 1.0)
    on_gpu = all(p.is_cuda for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=config.betas, eps=config.eps, fused=on_gpu or None)
    return with_schedule(module, optimizer, config)


def resumable_optim(config: OptimConfig, checkpoint: Mapping[str, Any], owner: str) -> OptimConfig:
    """``config``, or its variant whose parameter groups fit the optimizer state of an older ``checkpoint``.

    Checkpoints of lightning-mim 0.1 grouped parameters by timm's rule (:data:`TIMM_DECAY_RULE`) for
    every method; a method whose official rule differs cannot load their optimizer state into its
    own groups. Such a checkpoint (its stored optim hyperparameters have no ``decay_rule``) resumes
    with timm's rule, with a warning; a new run uses the method's rule.
    """
    hparams = checkpoint.get("hyper_parameters")
    stored = hparams.get("optim") if isinstance(hparams, Mapping) else None
    if not isinstance(stored, Mapping) or "decay_rule" in stored or config.decay_rule == TIMM_DECAY_RULE:
        return config
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"{owner}: this checkpoint was written by lightning-mim 0.1, whose weight-decay rule (1-D parameters, "
        f"biases and no_weight_decay() names) differs from {owner}'s official one; resuming from it keeps the "
        "old rule so that its optimizer state fits. Start a new run for the official rule"
    )
    return dataclasses.replace(config, decay_rule=TIMM_DECAY_RULE)
