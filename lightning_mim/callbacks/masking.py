"""Attach masks to the batches of any LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mim._rng import make_generator
from lightning_mim.masking import MaskGenerator

__all__ = ["MaskingCallback"]

_MASK_STREAM = 11


class MaskingCallback(Callback):
    """Adds a mask from ``masking`` to every dict batch, on the batch's device.

    Runs in ``on_train_batch_start`` / ``on_validation_batch_start``, after Lightning has moved the
    batch to the device, and writes ``batch[key]``: a bool (B, N) tensor, True = masked. The batch
    size is read from the first tensor in the batch. Masks are drawn from a generator seeded from the
    run seed and the rank; its state is saved in checkpoints, so a resumed run continues the stream.

    Example::

        trainer = Trainer(callbacks=[MaskingCallback(BlockMasking(input_size=14))])
        # in your training_step: mask = batch["mask"]

    Args:
        masking: Any mask generator (``BlockMasking``, ``RandomMasking``, ``GridMasking``, ...).
        key: Batch key to write the mask under.
        validation: Also add masks to validation batches.
    """

    def __init__(self, masking: MaskGenerator, key: str = "mask", validation: bool = True) -> None:
        self.masking = masking
        self.key = key
        self.validation = validation
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._generator is None:
            self._generator = make_generator(_MASK_STREAM, trainer.global_rank)
        if self._pending_state is not None:
            self._generator.set_state(self._pending_state)
            self._pending_state = None

    def _attach(self, batch: Any) -> None:
        if not isinstance(batch, dict):
            raise TypeError(f"MaskingCallback needs dict batches, got {type(batch).__name__}")
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        if first is None:
            raise ValueError("MaskingCallback: the batch holds no tensor to read the batch size from")
        assert self._generator is not None
        batch[self.key] = self.masking(first.shape[0], device=first.device, generator=self._generator)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._attach(batch)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.validation:
            self._attach(batch)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"generator_state": self._generator.get_state()} if self._generator is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator_state" in state_dict:
            self._pending_state = state_dict["generator_state"]
            if self._generator is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
