"""Plumbing of a method's steps that every method module composes: small pieces, no base class.

Each piece does one thing that the methods used to write out on their own (and let drift apart): the
normalisation arguments, the evaluation views, the masks of training and validation steps, the
``encoder(which)`` choice, and the typed result of ``compute_losses``. What a method keeps in its
checkpoints is in :mod:`lightning_mim.methods._state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_mim._rng import CountedStream, Stream, make_generator
from lightning_mim.data.views import EvalView
from lightning_mim.masking import MaskGenerator
from lightning_mim.methods._validation import check_normalization

__all__ = [
    "LossTerms",
    "MaskDraws",
    "checked_normalization",
    "eval_views",
    "pick_encoder",
    "sync_batchnorm_on_gpus",
]


_M = TypeVar("_M", bound=nn.Module)


@dataclass(frozen=True)
class LossTerms:
    """What a method's ``compute_losses`` returns: named loss terms, their weights, and what is only logged.

    The loss minimised is :attr:`total`, the weighted sum of ``terms`` in their order. The training
    step logs it as ``train/loss`` and every term under its own name (``train/loss_rec``); a single
    term named ``"loss"`` is the total itself and is logged once.

    Attributes:
        terms: Name -> unweighted scalar loss (``{"loss_rec": ..., "loss_con": ...}``).
        weights: Name -> weight of that term in the total (a term without one has weight 1).
        metrics: Name -> scalar logged beside the terms, not optimised (CIM's ``gen_accuracy``).
        outputs: Name -> tensors for diagnostics, neither logged nor optimised.
    """

    terms: dict[str, Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """The weighted sum of the terms."""
        total: Tensor | None = None
        for name, term in self.terms.items():
            weight = self.weights.get(name)
            weighted = term if weight is None else weight * term
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError("LossTerms has no terms")
        return total

    def log(self, module: pl.LightningModule, stage: str = "train") -> Tensor:
        """Logs ``{stage}/loss`` (on the progress bar), each term and each metric; returns the total."""
        total = self.total
        module.log(f"{stage}/loss", total, prog_bar=True)
        for name, value in {**self.terms, **self.metrics}.items():
            if name != "loss":
                module.log(f"{stage}/{name}", value)
        return total


def checked_normalization(
    owner: str, mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as tuples, after checking them (three means, three positive stds).

    Raises:
        ValueError: ``Owner(mean=..., std=...): why``.
    """
    check_normalization(owner, mean, std)
    return tuple(mean), tuple(std)


def eval_views(image_size: int) -> EvalView:
    """The validation and kNN transform of every method: a centre crop of 87.5% (none below 64 px)."""
    return EvalView(size=image_size, crop_fraction=0.875 if image_size >= 64 else 1.0)


def pick_encoder(module: nn.Module, which: str, **encoders: _M) -> _M:
    """``encoders[which]``: what a method's ``encoder(which)`` returns; another name is a ValueError naming them."""
    if which not in encoders:
        offered = " and ".join(map(repr, encoders))
        raise ValueError(f"{type(module).__name__}.encoder(which={which!r}): this module has {offered}")
    return encoders[which]


class MaskDraws:
    """The masks of a method's training and validation steps, drawn so that a resumed run repeats them.

    Training masks come from a :class:`~lightning_mim._rng.CountedStream` (run seed, stream, rank,
    draw number), which also seeds the global generators for the step (dropout, drop path), so a run
    resumed from a checkpoint draws exactly what the uninterrupted run drew. Validation masks are fixed
    per (rank, batch index): ``val/`` losses compare across epochs, and validation never advances the
    training stream.

    Args:
        stream: The method's id in :class:`~lightning_mim._rng.Stream`.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._counted = CountedStream(stream)

    def training(self, module: pl.LightningModule, masking: MaskGenerator, batch_size: int) -> Tensor:
        """Seeds the step's global generators, then draws the next training mask (B, N) on the module's device."""
        self._counted.seed_global(module.global_rank)
        generator = self._counted.next(module.global_rank, module.device)
        return masking(batch_size, device=module.device, generator=generator)

    def validation(self, module: pl.LightningModule, masking: MaskGenerator, batch_size: int, batch_idx: int) -> Tensor:
        """The fixed mask (B, N) of validation batch ``batch_idx`` on this rank."""
        generator = make_generator(self.stream, rank=module.global_rank, base=batch_idx)
        return masking(batch_size, device=module.device, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return self._counted.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._counted.load_state_dict(state)


def sync_batchnorm_on_gpus(trainer: Any, module: _M) -> _M:
    """``module`` with its BatchNorms turned into SyncBatchNorm when training on several GPUs.

    torch's SyncBatchNorm runs on GPUs only: on one device the module is returned unchanged, and a
    multi-process run without CUDA warns that statistics stay per rank.
    """
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.utilities import rank_zero_warn

    if trainer.world_size <= 1:
        return module
    if not isinstance(trainer.accelerator, CUDAAccelerator):
        rank_zero_warn("BatchNorm statistics are not synchronised across ranks (SyncBatchNorm needs GPUs)")
        return module
    # Conversion swaps BatchNorm children in place and returns the same container module.
    return cast(_M, nn.SyncBatchNorm.convert_sync_batchnorm(module))
