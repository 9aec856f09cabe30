"""lightning-mim: masked-image-modeling pre-training of vision encoders with PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_mim.methods import CMAEModule, ConMIMModule

__all__ = ["CMAEModule", "ConMIMModule", "__version__"]
