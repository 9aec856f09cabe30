"""lightning-mim: masked-image-modeling pre-training of vision encoders with PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_mim.methods import CMAEModule, ConMIMModule, MimCoModule, MoCoV3Module

__all__ = ["CMAEModule", "ConMIMModule", "MimCoModule", "MoCoV3Module", "__version__"]
