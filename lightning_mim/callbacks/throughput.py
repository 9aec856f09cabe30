"""MFUMonitor: Lightning's ThroughputMonitor with measured FLOPs and an explicit device peak."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

__all__ = ["MFUMonitor"]

#: Dense bf16 peaks (TFLOP/s) that Lightning's own table lacks or gets wrong for pre-training.
_KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0}


def _images_in(batch: Any) -> int:
    return int(batch["images"].shape[0])


class MFUMonitor(ThroughputMonitor):
    """Throughput and model FLOPs utilisation of any LightningModule, logged during training.

    FLOPs per batch are counted on the first training batch with ``torch.utils.flop_counter`` —
    forward, backward and everything else in the step, on the real module, precision and batch — and
    stored as ``pl_module.flops_per_batch``, which Lightning's ThroughputMonitor reads (a module that
    already defines it keeps its own value). The device peak is ``available_tflops`` when given, else
    989 TFLOP/s for H100/H200 (dense bf16; Lightning's table has no H200), else Lightning's table
    (nothing for CPUs: then samples/s and FLOP/s are logged without MFU).

    Args:
        available_tflops: Peak TFLOP/s per device for the MFU denominator.
        batch_size_fn: Images in a batch (default: ``len(batch["images"])``).
        **kwargs: ThroughputMonitor / Throughput arguments (``window_size``, ``separator``, ...).
    """

    def __init__(
        self,
        available_tflops: float | None = None,
        batch_size_fn: Callable[[Any], int] = _images_in,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size_fn=batch_size_fn, **kwargs)
        self.available_tflops = available_tflops
        self._counter: FlopCounterMode | None = None
        self._measured = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.available_tflops
        device = trainer.strategy.root_device
        if peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((value for key, value in _KNOWN_PEAKS.items() if key in name), None)
        if peak is not None:
            self.available_flops = int(peak * 1e12)
            for throughput in self._throughputs.values():  # built by ThroughputMonitor.setup with its own value
                throughput.available_flops = self.available_flops

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._measured and getattr(pl_module, "flops_per_batch", None) is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            setattr(pl_module, "flops_per_batch", self._counter.get_total_flops())  # noqa: B010 - read by ThroughputMonitor
            self._counter = None
        self._measured = True
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
