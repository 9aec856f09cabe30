"""Images <-> patch sequences, in MAE's layout (row-major grid, pixels ordered (p, q, c))."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["patchify", "unpatchify"]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P*P*C) patches in row-major grid order, pixels ordered (p, q, c) as in MAE."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch_size}")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, h * w, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: (B, h*w, P*P*C) -> (B, C, h*P, w*P) for a ``grid`` of (h, w)."""
    batch, num, dim = patches.shape
    h, w = grid
    channels = dim // (patch_size * patch_size)
    if num != h * w or channels * patch_size * patch_size != dim:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {h}x{w} grid of {patch_size}-px patches"
        )
    x = patches.reshape(batch, h, w, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, h * patch_size, w * patch_size)
