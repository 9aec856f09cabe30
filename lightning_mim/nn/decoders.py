"""The MAE decoder: visible tokens + mask tokens -> per-patch predictions."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightning_mim.nn.masked_vit import visible_indices
from lightning_mim.nn.pos_embed import SinCosOrder, sincos_2d_pos_embed

__all__ = ["MAEDecoder"]


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (He et al., arXiv:2111.06377), built from timm blocks.

    Encoder tokens (prefix + visible patches, grid order) are embedded to ``dim``; a learned mask
    token fills the masked positions; fixed sin-cos position embeddings are added; ``depth`` pre-norm
    transformer blocks, a LayerNorm and a linear head follow. The prefix tokens are dropped from the
    output. CMAE uses it twice: as the pixel decoder (8 blocks) and the feature decoder (2 blocks).

    Args:
        grid_size: Patch grid (height, width).
        in_dim: Encoder width.
        out_dim: Output width per patch (P * P * C for pixels).
        dim: Decoder width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width / dim.
        num_prefix_tokens: Prefix (class) tokens in the encoder output.
        pos_embed_order: Which grid coordinate the first half of the sin-cos channels encodes:
            ``"columns_first"`` (MAE's table) or ``"rows_first"`` (CMAE's, as MoCo v3's).
    """

    pos_embed: Tensor

    def __init__(
        self,
        grid_size: tuple[int, int],
        in_dim: int,
        out_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
        pos_embed_order: SinCosOrder = "columns_first",
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_patches = grid_size[0] * grid_size[1]
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", torch.empty(1, self.num_patches, dim), persistent=False)
        self.set_pos_embed_order(pos_embed_order)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm) for _ in range(depth)]
        )
        self.norm = _LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's initialisation: Xavier-uniform linear layers, zero biases, mask token N(0, 0.02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_pos_embed_order(self, order: SinCosOrder) -> None:
        """Fills the fixed position table (not in checkpoints) with the sin-cos layout ``order``."""
        dim = self.pos_embed.shape[-1]
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_pos_embed(self.grid_size, dim, cls_token=False, order=order))
        self.pos_embed_order = order

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """(B, P + N_visible, in_dim) encoder output and its (B, N) mask -> (B, N, out_dim)."""
        x = self.embed(tokens)  # (B, P + N_visible, dim)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, num_visible, dim = visible.shape
        keep = visible_indices(mask, num_visible)  # (B, N_visible)
        full = self.mask_token.to(x.dtype).expand(batch, self.num_patches, dim)
        full = full.scatter(1, keep.unsqueeze(-1).expand(batch, num_visible, dim), visible)  # (B, N, dim)
        x = torch.cat([prefix, full + self.pos_embed.to(x.dtype)], dim=1)
        x = self.norm(self.blocks(x))
        return self.head(x[:, self.num_prefix_tokens :])  # (B, N, out_dim)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm with MAE's epsilon, 1e-6."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, eps=1e-6, **kwargs)
