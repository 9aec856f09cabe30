"""Fixed 2-D sine-cosine position embeddings (MAE, CMAE, MoCo v3)."""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor, nn

#: Which grid coordinate the first half of the channels encodes: MAE's reference code encodes the
#: column index first; MoCo v3's (and mmselfsup's) encodes the row index first.
SinCosOrder = Literal["columns_first", "rows_first"]

__all__ = ["freeze_sincos_pos_embed", "sincos_2d_pos_embed", "sincos_order_of"]


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(M,) positions -> (M, dim): sin of pos * omega_i, then cos, omega_i = 10000^(-i / (dim / 2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]  # (M, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(
    grid_size: tuple[int, int], dim: int, cls_token: bool = True, order: SinCosOrder = "columns_first"
) -> Tensor:
    """The fixed sin-cos position embedding: (1, [1 +] H*W, dim), float32, row-major grid order.

    Each half of the channels is (sin, cos) of one grid coordinate. With ``order="columns_first"``
    the first ``dim / 2`` channels encode the column index (MAE's reference code); with
    ``"rows_first"`` the row index (MoCo v3's ``build_2d_sincos_position_embedding``). The
    class-token position, if any, is all zeros.
    """
    if dim % 4:
        raise ValueError(f"embedding dim must be divisible by 4, got {dim}")
    if order not in ("columns_first", "rows_first"):
        raise ValueError(f"order must be 'columns_first' or 'rows_first', got {order!r}")
    height, width = grid_size
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    halves = [_sincos_1d(cols.flatten(), dim // 2), _sincos_1d(rows.flatten(), dim // 2)]
    embed = torch.cat(halves if order == "columns_first" else halves[::-1], dim=1)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=embed.dtype), embed])
    return embed.float().unsqueeze(0)


def freeze_sincos_pos_embed(
    pos_embed: nn.Parameter, grid_size: tuple[int, int], order: SinCosOrder = "columns_first"
) -> None:
    """Overwrites a (1, [1 +] N, D) position embedding with the fixed sin-cos table and freezes it."""
    num_tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    with_cls = num_tokens == grid_size[0] * grid_size[1] + 1
    with torch.no_grad():
        pos_embed.copy_(sincos_2d_pos_embed(grid_size, dim, cls_token=with_cls, order=order))
    pos_embed.requires_grad_(False)


def sincos_order_of(table: Tensor, grid_size: tuple[int, int], atol: float = 1e-5) -> SinCosOrder | None:
    """The layout of a (1, [1 +] N, D) fixed sin-cos table (see :func:`sincos_2d_pos_embed`); None: neither.

    A table that is neither (learned, interpolated, of another grid) is None.
    """
    num_tokens, dim = int(table.shape[1]), int(table.shape[2])
    num_patches = grid_size[0] * grid_size[1]
    if num_tokens not in (num_patches, num_patches + 1) or dim % 4:
        return None
    for order in ("rows_first", "columns_first"):
        reference = sincos_2d_pos_embed(grid_size, dim, cls_token=num_tokens > num_patches, order=order)
        if torch.allclose(table.detach().float().cpu(), reference, atol=atol):
            return cast(SinCosOrder, order)
    return None
