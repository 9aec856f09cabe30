"""Callbacks that work with any LightningModule: EMA teacher, masking, online kNN, visual diagnostics."""

from lightning_mim.callbacks.diagnostics import VisualDiagnostics
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.callbacks.knn import OnlineKNN
from lightning_mim.callbacks.masking import MaskingCallback

__all__ = ["EMATeacher", "MaskingCallback", "OnlineKNN", "VisualDiagnostics"]
