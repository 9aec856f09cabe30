"""Method modules: one LightningModule per published method (each imported on first use)."""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_mim.methods.cim import CIMModule
    from lightning_mim.methods.cmae import CMAEModule
    from lightning_mim.methods.conmim import ConMIMModule
    from lightning_mim.methods.finetune import FineTuneModule
    from lightning_mim.methods.linear_probe import LinearProbeModule
    from lightning_mim.methods.mimco import MimCoModule
    from lightning_mim.methods.moco import MoCoV3Module
    from lightning_mim.methods.tokenizer import VQTokenizerModule

_EXPORTS = {
    "CIMModule": "lightning_mim.methods.cim",
    "CMAEModule": "lightning_mim.methods.cmae",
    "ConMIMModule": "lightning_mim.methods.conmim",
    "FineTuneModule": "lightning_mim.methods.finetune",
    "LinearProbeModule": "lightning_mim.methods.linear_probe",
    "MimCoModule": "lightning_mim.methods.mimco",
    "MoCoV3Module": "lightning_mim.methods.moco",
    "VQTokenizerModule": "lightning_mim.methods.tokenizer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "CIMModule",
    "CMAEModule",
    "ConMIMModule",
    "FineTuneModule",
    "LinearProbeModule",
    "MimCoModule",
    "MoCoV3Module",
    "VQTokenizerModule",
]
