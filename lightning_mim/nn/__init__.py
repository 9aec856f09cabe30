"""Reusable layers: the masked ViT wrapper over timm, decoders, heads, CIM's tokenizers and enhancer."""

from lightning_mim.nn.decoders import MAEDecoder
from lightning_mim.nn.enhancer import Enhancer
from lightning_mim.nn.heads import BNProjector
from lightning_mim.nn.masked_vit import MaskedViT, visible_indices
from lightning_mim.nn.pos_embed import freeze_sincos_pos_embed, sincos_2d_pos_embed
from lightning_mim.nn.tokenizer import DALLETokenizer, ImageTokenizer, VQTokenizer

__all__ = [
    "BNProjector",
    "DALLETokenizer",
    "Enhancer",
    "ImageTokenizer",
    "MAEDecoder",
    "MaskedViT",
    "VQTokenizer",
    "freeze_sincos_pos_embed",
    "sincos_2d_pos_embed",
    "visible_indices",
]
