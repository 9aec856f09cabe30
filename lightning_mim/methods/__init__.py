"""Method modules: one LightningModule per published method."""

from lightning_mim.methods.cim import CIMModule
from lightning_mim.methods.cmae import CMAEModule
from lightning_mim.methods.conmim import ConMIMModule
from lightning_mim.methods.finetune import FineTuneModule, LinearProbeModule
from lightning_mim.methods.mimco import MimCoModule
from lightning_mim.methods.moco import MoCoV3Module
from lightning_mim.methods.tokenizer import VQTokenizerModule

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
