"""Pictures of what a method sees and produces: the panels that VisualDiagnostics lays out.

Pure tensor functions (images in [0, 1], (B, 3, H, W)); method modules build their ``diagnostics()``
panels from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["heatmap", "mask_overlay", "similarity_panels", "to_unit_range", "unnormalize"]


def unnormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised (B, 3, H, W) -> [0, 1]."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std_t + mean_t).clamp(0, 1)


def to_unit_range(images: Tensor) -> Tensor:
    """Per-image min-max scaling to [0, 1] (for targets such as window-normalised images)."""
    flat = images.float().flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    return ((flat - low[:, None]) / (high - low).clamp(min=1e-6)[:, None]).view_as(images)


def _upsample(values: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, N) per-patch values -> (B, 1, H, W), each patch a constant block."""
    return F.interpolate(values.float().view(-1, 1, *grid), size=size, mode="nearest")


def mask_overlay(images: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """[0, 1] images with masked patches (``mask`` (B, N), True = hidden) shown dark grey."""
    hidden = _upsample(mask, grid, tuple(images.shape[-2:]))  # type: ignore[arg-type]
    return images * (1 - hidden) + 0.15 * hidden


def heatmap(values: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Per-patch values in [0, 1] (B, N) -> blue (0) to red (1) images (B, 3, H, W)."""
    v = _upsample(values.clamp(0, 1), grid, size)
    return torch.cat((v, 0.2 * torch.ones_like(v), 1 - v), dim=1)


def similarity_panels(
    images: Tensor, mask: Tensor, student: Tensor, teacher: Tensor, grid: tuple[int, int]
) -> dict[str, Tensor]:
    """Input, mask overlay, and the per-patch cosine similarity of student and teacher features.

    Args:
        images: uint8 (B, 3, H, W).
        mask: Bool (B, N), True = hidden from the student.
        student: Student patch features (B, N, D).
        teacher: Teacher patch features (B, N, D).
        grid: Patch grid (h, w).
    """
    pixels = images.float() / 255.0
    similarity = F.cosine_similarity(student.float(), teacher.float(), dim=-1)  # (B, N) in [-1, 1]
    size = (pixels.shape[-2], pixels.shape[-1])
    return {
        "input": pixels,
        "mask": mask_overlay(pixels, mask, grid),
        "similarity": heatmap((similarity + 1) / 2, grid, size),
    }
