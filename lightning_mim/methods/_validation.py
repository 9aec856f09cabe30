"""Checks of method-module arguments that cannot work, with errors naming the argument and the reason.

Every message reads ``Owner(argument=value): why``, e.g. ``MoCoV3Module(momentum=1.5): an EMA momentum
must be in [0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_mim.masking import MaskGenerator

__all__ = [
    "check_choice",
    "check_contrastive_batch",
    "check_crop_scale",
    "check_divisible",
    "check_input_size",
    "check_loss_weights",
    "check_mask_count",
    "check_mask_grid",
    "check_momenta",
    "check_non_negative",
    "check_normalization",
    "check_positive",
    "check_visible_masking",
]


def check_positive(owner: str, **values: float | None) -> None:
    """Each value (None is skipped) must be > 0: a width, a size, a temperature."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{owner}({name}={value}): must be > 0")


def check_non_negative(owner: str, **values: float) -> None:
    """Each value must be >= 0: a loss weight, a regularisation strength."""
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{owner}({name}={value}): must be >= 0")


def check_loss_weights(owner: str, **weights: float) -> None:
    """The weights of a loss's terms: each >= 0, and not all 0 (the loss would be 0)."""
    check_non_negative(owner, **weights)
    if not any(weight > 0 for weight in weights.values()):
        given = ", ".join(f"{name}={weight:g}" for name, weight in weights.items())
        raise ValueError(f"{owner}({given}): the loss would be 0; give one a weight > 0")


def check_divisible(owner: str, **pair: int) -> None:
    """The first of two values must be a multiple of the second, e.g. a width and its attention heads."""
    (name, value), (divisor_name, divisor) = pair.items()
    if value % divisor:
        given = f"{name}={value}, {divisor_name}={divisor}"
        raise ValueError(f"{owner}({given}): {name} must be a multiple of {divisor_name}")


def check_choice(owner: str, choices: Sequence[str], **values: str) -> None:
    """Each value must be one of ``choices``."""
    for name, value in values.items():
        if value not in choices:
            raise ValueError(f"{owner}({name}={value!r}): must be one of {', '.join(map(repr, choices))}")


def check_momenta(owner: str, **momenta: float) -> None:
    """Each EMA momentum must be in [0, 1] (teacher <- m * teacher + (1 - m) * student)."""
    for name, value in momenta.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{owner}({name}={value}): an EMA momentum must be in [0, 1] "
                "(teacher <- m * teacher + (1 - m) * student)"
            )


def check_normalization(owner: str, mean: Sequence[float], std: Sequence[float]) -> None:
    """Per-channel normalisation of RGB images: three means and three positive stds."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{owner}(mean={tuple(mean)}, std={tuple(std)}): need one value per RGB channel (3 each)")
    if not all(s > 0 for s in std):
        raise ValueError(f"{owner}(std={tuple(std)}): must be > 0 (images are divided by it)")


def check_crop_scale(owner: str, crop_scale: Sequence[float]) -> tuple[float, float]:
    """A random resized crop's (min, max) fraction of the image area; returned as a tuple."""
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(
            f"{owner}(crop_scale={tuple(crop_scale)}): the crop's (min, max) fraction of the image area "
            "must satisfy 0 < min <= max <= 1"
        )
    return float(crop_scale[0]), float(crop_scale[1])


def check_input_size(owner: str, model: Any, **sizes: int | None) -> None:
    """Image sides (None is skipped) that a timm ViT/BEiT with a fixed input size must be built for.

    timm's patch embedding refuses any other size at the first forward pass; a model built with
    ``dynamic_img_size=True`` (or a CNN) takes any size and is not checked.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not getattr(patch_embed, "strict_img_size", False):
        return
    height, width = (int(s) for s in patch_embed.img_size)
    for name, size in sizes.items():
        if size is not None and (size, size) != (height, width):
            raise ValueError(
                f"{owner}({name}={size}): the encoder takes {height}x{width} images (its img_size); set "
                f"{name}={height}, or build it with dynamic_img_size=True in model_kwargs"
            )


def check_mask_count(owner: str, masking: MaskGenerator, *, needs_visible: bool = False) -> None:
    """The generator masks at least one patch and no more than its grid has.

    With ``needs_visible``, it also leaves at least one visible: encoders that drop masked tokens
    need one.
    """
    count, total = masking.num_masking_patches, masking.num_patches
    limit = total - 1 if needs_visible else total
    if not 0 < count <= limit:
        reason = "at least one must stay visible, " if needs_visible and count == total else ""
        raise ValueError(
            f"{owner}(masking={masking!r}): masks {count} of the {total} patches of its grid; "
            f"{reason}it must mask between 1 and {limit}"
        )


def check_contrastive_batch(module: Any, loss: str) -> None:
    """Fails (at the start of training) when the global batch cannot give an InfoNCE any negatives.

    An InfoNCE over the global batch contrasts each image with the others: with a single image it is
    exactly 0 and trains nothing. Only the per-device batch size of the training loader is known, and
    only once it is built, so a method calls this from ``on_train_start``. A loader without a fixed
    ``batch_size`` (a custom batch sampler) is not checked.

    Args:
        module: The LightningModule, attached to its trainer.
        loss: The loss, for the message (e.g. "MoCo v3's contrastive loss").
    """
    trainer = module.trainer
    loader = trainer.train_dataloader
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(batch_size, int):
        return
    owner, world = type(module).__name__, trainer.world_size
    if batch_size * world < 2:
        raise ValueError(
            f"{owner}: the global batch is {batch_size * world} image ({batch_size} per device x {world} "
            f"device(s)); {loss} is an InfoNCE over the global batch and needs at least 2 images (the other "
            "images are the negatives): raise the data module's batch_size"
        )
    # Under DDP the sampler pads every rank to the same count, so a last global batch has >= 2 images.
    dataset: Any = getattr(loader, "dataset", None)
    size = len(dataset) if world == 1 and hasattr(dataset, "__len__") else None
    if size is not None and not getattr(loader, "drop_last", True) and size % batch_size == 1:
        raise ValueError(
            f"{owner}: the training loader's last batch holds 1 image ({size} images, batch_size {batch_size}, "
            f"drop_last=False); {loss} needs at least 2 images per batch: set drop_last=True"
        )


def check_mask_grid(owner: str, masking: MaskGenerator, grid: tuple[int, int], what: str = "patch grid") -> None:
    """The mask generator draws masks over ``grid`` (the encoder's patch grid, or CIM's token grid)."""
    if (masking.height, masking.width) != tuple(grid):
        raise ValueError(
            f"{owner}(masking={masking!r}): its grid ({masking.height}, {masking.width}) does not match the "
            f"{what} {tuple(grid)}; build the generator for that grid"
        )


def check_visible_masking(owner: str, masking: MaskGenerator, grid: tuple[int, int]) -> None:
    """A generator for an encoder that drops the masked patches (MAE, CMAE).

    On ``grid``, the same count in every image, at least one patch masked and one visible.
    """
    check_mask_grid(owner, masking, grid)
    if not masking.fixed_count:
        raise ValueError(
            f"{owner}(masking={masking!r}): masks a varying number of patches; the encoder drops the masked "
            "ones and needs the same count in every image"
        )
    check_mask_count(owner, masking, needs_visible=True)
