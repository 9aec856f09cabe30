"""Pictures of what a method sees and produces: the panels that VisualDiagnostics lays out.

Pure tensor functions (images in [0, 1], (B, 3, H, W)); method modules build their ``diagnostics()``
panels from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mim.data.views import normalize
from lightning_mim.patches import patchify, unpatchify

__all__ = [
    "cim_panels",
    "heatmap",
    "mask_overlay",
    "reconstruction_panels",
    "similarity_panels",
    "to_unit_range",
    "unnormalize",
]


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


def reconstruction_panels(
    images: Tensor,
    mask: Tensor,
    pred: Tensor,
    patch_size: int,
    grid: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    norm_pix: bool,
) -> dict[str, Tensor]:
    """Input, mask overlay, and an MAE-style reconstruction: visible patches as given, masked ones predicted.

    Args:
        images: uint8 (B, 3, H, W).
        mask: Bool (B, N), True = hidden from the encoder.
        pred: Predicted pixels of every patch (B, N, P*P*3), of the normalised image.
        patch_size: P.
        grid: Patch grid (h, w).
        mean: Normalisation mean of the images.
        std: Normalisation std.
        norm_pix: The prediction targets were normalised per patch: map the prediction back with each
            target patch's own mean and variance, as MAE shows it.
    """
    pixels = images.float() / 255.0
    target = patchify(normalize(images, mean, std), patch_size)  # (B, N, P*P*3)
    pred = pred.float()
    if norm_pix:
        mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mu
    reconstruction = unpatchify(torch.where(mask.unsqueeze(-1), pred, target), patch_size, grid)
    return {
        "input": pixels,
        "mask": mask_overlay(pixels, mask, grid),
        "reconstruction": unnormalize(reconstruction, mean, std),
    }


def cim_panels(
    images: Tensor,
    mask: Tensor,
    outputs: dict[str, Tensor],
    target: Tensor,
    grid: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    objective: str,
) -> dict[str, Tensor]:
    """CIM's panels: input, mask, the corrupted image, and the enhancer's output.

    ResPix: its prediction next to the window-normalised ``target`` (each min-max scaled); RevDet: the
    predicted replacement probability per token next to the true replacements (blue = original, red =
    replaced).

    Args:
        images: uint8 (B, 3, H, W).
        mask: Bool (B, N) over the token grid.
        outputs: CIM's ``compute_losses(...).outputs`` (``corrupted_images``, ``output``, ``replaced``).
        target: The ResPix target (B, 3, H, W).
        grid: Token grid (h, w).
        mean: Normalisation mean of the images.
        std: Normalisation std.
        objective: ``"respix"`` or ``"revdet"``.
    """
    pixels = images.float() / 255.0
    size = (pixels.shape[-2], pixels.shape[-1])
    panels = {
        "input": pixels,
        "mask": mask_overlay(pixels, mask, grid),
        "corrupted": unnormalize(outputs["corrupted_images"], mean, std),
    }
    if objective == "respix":
        panels["respix"] = to_unit_range(outputs["output"])
        panels["target"] = to_unit_range(target)
    else:
        panels["revdet"] = heatmap(torch.sigmoid(outputs["output"].float()), grid, size)
        panels["replaced"] = heatmap(outputs["replaced"].float(), grid, size)
    return panels
