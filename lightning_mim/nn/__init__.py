"""Reusable layers.

The masked ViT wrapper over timm, decoders, heads, CIM's tokenizers, generator and enhancer (each
imported on first use).
"""

from typing import TYPE_CHECKING

from lightning_mim._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_mim.nn.decoders import MAEDecoder
    from lightning_mim.nn.enhancer import Enhancer
    from lightning_mim.nn.heads import BNProjector
    from lightning_mim.nn.masked_vit import MaskedViT, visible_indices
    from lightning_mim.nn.pos_embed import freeze_sincos_pos_embed, sincos_2d_pos_embed, sincos_order_of
    from lightning_mim.nn.tokenizer import DALLETokenizer, ImageTokenizer, VQTokenizer

_EXPORTS = {
    "MAEDecoder": "lightning_mim.nn.decoders",
    "Enhancer": "lightning_mim.nn.enhancer",
    "BNProjector": "lightning_mim.nn.heads",
    "MaskedViT": "lightning_mim.nn.masked_vit",
    "visible_indices": "lightning_mim.nn.masked_vit",
    "freeze_sincos_pos_embed": "lightning_mim.nn.pos_embed",
    "sincos_2d_pos_embed": "lightning_mim.nn.pos_embed",
    "sincos_order_of": "lightning_mim.nn.pos_embed",
    "DALLETokenizer": "lightning_mim.nn.tokenizer",
    "ImageTokenizer": "lightning_mim.nn.tokenizer",
    "VQTokenizer": "lightning_mim.nn.tokenizer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
    "sincos_order_of",
    "visible_indices",
]
