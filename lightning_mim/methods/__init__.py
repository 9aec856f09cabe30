"""Method modules: one LightningModule per published method."""

from lightning_mim.methods.cmae import CMAEModule
from lightning_mim.methods.conmim import ConMIMModule

__all__ = ["CMAEModule", "ConMIMModule"]
