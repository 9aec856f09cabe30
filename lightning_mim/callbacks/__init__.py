"""Callbacks that work with any LightningModule.

EMA teacher, masking, online kNN, visual diagnostics, MFU, preemption (each imported on first use).
"""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_mim.callbacks.diagnostics import VisualDiagnostics
    from lightning_mim.callbacks.ema import EMATeacher
    from lightning_mim.callbacks.knn import OnlineKNN
    from lightning_mim.callbacks.masking import MaskingCallback
    from lightning_mim.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
    from lightning_mim.callbacks.preemption import Preemption
    from lightning_mim.callbacks.throughput import MFUMonitor

_EXPORTS = {
    "VisualDiagnostics": "lightning_mim.callbacks.diagnostics",
    "EMATeacher": "lightning_mim.callbacks.ema",
    "OnlineKNN": "lightning_mim.callbacks.knn",
    "MaskingCallback": "lightning_mim.callbacks.masking",
    "NonFiniteGuard": "lightning_mim.callbacks.nonfinite",
    "NonFiniteLossError": "lightning_mim.callbacks.nonfinite",
    "Preemption": "lightning_mim.callbacks.preemption",
    "MFUMonitor": "lightning_mim.callbacks.throughput",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
