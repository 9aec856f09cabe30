"""Callbacks that work with any LightningModule: EMA teacher, masking, online kNN, visual diagnostics, MFU,
preemption."""

from lightning_mim.callbacks.diagnostics import VisualDiagnostics
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.callbacks.knn import OnlineKNN
from lightning_mim.callbacks.masking import MaskingCallback
from lightning_mim.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from lightning_mim.callbacks.preemption import Preemption
from lightning_mim.callbacks.throughput import MFUMonitor

__all__ = [
    "EMATeacher",
    "MFUMonitor",
    "MaskingCallback",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "OnlineKNN",
    "Preemption",
    "VisualDiagnostics",
]
