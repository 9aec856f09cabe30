"""lightning-mim: masked-image-modeling pre-training of vision encoders with PyTorch Lightning.

The method modules are imported on first use (``lightning_mim.ConMIMModule``), so importing a part
(``lightning_mim.losses``, ``lightning_mim.masking``) loads only what that part needs.
"""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports

__version__ = "0.2.0"

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
    "__version__",
]
