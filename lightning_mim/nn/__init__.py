"""Reusable layers: the masked ViT wrapper over timm and projection heads."""

from lightning_mim.nn.heads import BNProjector
from lightning_mim.nn.masked_vit import MaskedViT

__all__ = ["BNProjector", "MaskedViT"]
