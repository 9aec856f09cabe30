"""Attach masks to the batches of any LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mim._rng import CountedStream, Stream, make_generator, mix_seed
from lightning_mim.masking import MaskGenerator

__all__ = ["MaskingCallback"]


class MaskingCallback(Callback):
    """Adds a mask from ``masking`` to every dict batch, on the batch's device.

    Runs in ``on_train_batch_start`` / ``on_validation_batch_start``, after Lightning has moved the
    batch to the device, and writes ``batch[key]``: a bool (B, N) tensor, True = masked. The batch
    size is read from the first tensor in the batch. Training masks are drawn from a generator seeded
    from the run seed, the rank and a draw counter; the counter is saved in checkpoints, so a resumed
    run continues the stream on every rank. Validation masks come from a stream of their own, seeded
    from the run seed, the rank and the batch index: the same masks at every evaluation, and a resumed
    run that skips a validation the original run did still draws the original training masks.

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
        self._stream = CountedStream(Stream.MASKING_CALLBACK)
        self._rank = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank

    def _attach(self, batch: Any, validation_index: tuple[int, int] | None = None) -> None:
        """Writes ``batch[key]``: the next training mask, or the validation mask of (dataloader, batch) index."""
        if not isinstance(batch, dict):
            raise TypeError(f"MaskingCallback needs dict batches, got {type(batch).__name__}")
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        if first is None:
            raise ValueError("MaskingCallback: the batch holds no tensor to read the batch size from")
        if validation_index is None:
            generator = self._stream.next(self._rank, first.device)
        else:
            if self._stream.base is None:  # a validation before the first training step
                self._stream.base = torch.initial_seed()
            base = mix_seed(self._stream.base, *validation_index)
            generator = make_generator(Stream.MASKING_CALLBACK_VALIDATION, self._rank, base, first.device)
        batch[self.key] = self.masking(first.shape[0], device=first.device, generator=generator)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._attach(batch)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.validation:
            self._attach(batch, validation_index=(dataloader_idx, batch_idx))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stream": self._stream.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream.load_state_dict(state_dict["stream"])
