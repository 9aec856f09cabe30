"""lightning-mim: masked-image-modeling pre-training of vision encoders with PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_mim.methods import ConMIMModule

__all__ = ["ConMIMModule", "__version__"]
