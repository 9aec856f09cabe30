"""Reusable layers: the masked ViT wrapper over timm, the MAE decoder, projection heads."""

from lightning_mim.nn.decoders import MAEDecoder
from lightning_mim.nn.heads import BNProjector
from lightning_mim.nn.masked_vit import MaskedViT, visible_indices
from lightning_mim.nn.pos_embed import freeze_sincos_pos_embed, sincos_2d_pos_embed

__all__ = [
    "BNProjector",
    "MAEDecoder",
    "MaskedViT",
    "freeze_sincos_pos_embed",
    "sincos_2d_pos_embed",
    "visible_indices",
]
