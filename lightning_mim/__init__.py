"""lightning-mim: masked-image-modeling pre-training of vision encoders with PyTorch Lightning."""

__version__ = "0.2.0"

from lightning_mim.methods import (
    CIMModule,
    CMAEModule,
    ConMIMModule,
    FineTuneModule,
    LinearProbeModule,
    MimCoModule,
    MoCoV3Module,
    VQTokenizerModule,
)

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
