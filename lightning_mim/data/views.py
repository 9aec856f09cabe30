"""View transforms: uint8 (C, H, W) image in, dict of uint8 views out.

They run in the data-loader workers and never normalise: normalisation and the conversion to float
happen on the device (:func:`normalize`), so workers ship 4x fewer bytes. The fast blur and colour
jitter the recipes use are in :mod:`lightning_mim.data.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from lightning_mim.data.kernels import ColorJitter, GaussianBlur, adjust_hue

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CMAEViews",
    "ClassificationViews",
    "ColorJitter",  # the kernels (lightning_mim.data.kernels) stay importable from here
    "ConMIMViews",
    "EvalView",
    "GaussianBlur",
    "MAEViews",
    "TwoCropViews",
    "adjust_hue",
    "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 ``(x / 255 - mean) / std``."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.float() - mean_t) / std_t


def _blur_kernel(size: int) -> int:
    """Odd Gaussian kernel of about 10% of the image side (23 px at 224), at least 3."""
    kernel = max(3, int(0.1 * size))
    return kernel if kernel % 2 else kernel + 1


class ConMIMViews:
    """ConMIM's two views of one image, sharing crop and flip so patch i matches patch i.

    Geometry: horizontal flip (p=0.5), then a random resized crop. The student view is the crop as
    is ("weak"); the teacher view ("strong") adds colour jitter, grayscale, Gaussian blur and
    solarisation. Values from the official ConMIM code.

    Args:
        size: Output side in pixels.
        scale: Crop area range of the random resized crop.
        ratio: Crop aspect range.
        color_jitter: Brightness, contrast, saturation, hue strengths.
        color_jitter_p: Probability of colour jitter.
        grayscale_p: Probability of grayscale.
        blur_p: Probability of Gaussian blur.
        blur_sigma: Blur sigma range.
        solarize_p: Probability of solarisation (threshold 128).
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: float = 0.2,
    ) -> None:
        self.geometry = v2.Compose(
            [
                v2.RandomHorizontalFlip(0.5),
                v2.RandomResizedCrop(
                    size, scale=scale, ratio=ratio, interpolation=InterpolationMode.BICUBIC, antialias=True
                ),
            ]
        )
        brightness, contrast, saturation, hue = color_jitter
        self.strong = v2.Compose(
            [
                v2.RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=color_jitter_p),
                v2.RandomGrayscale(grayscale_p),
                v2.RandomApply([GaussianBlur(_blur_kernel(size), sigma=blur_sigma)], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
            ]
        )

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        crop = self.geometry(image)
        return {"images": crop, "teacher_images": self.strong(crop)}


class EvalView:
    """Resize the shorter side to ``size / crop_fraction``, centre crop ``size`` (evaluation).

    An image more than twice as long as it is wide (or high) first loses the ends of its long side
    beyond twice the short side: the centre crop never reaches them, and a 1 x 400 strip would
    otherwise be resized to 256 x 102,400 pixels (about 200 MB in the worker) before being cropped.

    Args:
        size: Output side in pixels.
        crop_fraction: ``size / resize`` (0.875 gives 256 -> 224, the standard protocol).
    """

    def __init__(self, size: int = 224, crop_fraction: float = 0.875) -> None:
        resize = math.floor(size / crop_fraction) if crop_fraction < 1 else size
        self.transform = v2.Compose(
            [v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)]
        )

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        height, width = image.shape[-2:]
        longest = 2 * min(height, width)
        if max(height, width) > longest:
            image = v2.functional.center_crop(image, [min(height, longest), min(width, longest)])
        return {"images": self.transform(image)}


class CMAEViews:
    """CMAE's pixel-shifted views of one image, from one decode.

    A random resized crop to ``size + shift`` pixels (scale (0.2, 1), bicubic) and a horizontal flip
    give the base image. The online view is its top-left ``size`` crop, unchanged; the target view
    is the ``size`` crop at offsets (dy, dx) drawn uniformly from {0, ..., shift - 1}, then colour
    jitter, grayscale and Gaussian blur. Values from the official code (256 -> 224, shift 32).

    Args:
        size: Output side in pixels.
        shift: Extra base side in pixels; offsets are drawn below it.
        scale: Crop area range of the random resized crop.
        color_jitter: Brightness, contrast, saturation, hue strengths.
        color_jitter_p: Probability of colour jitter.
        grayscale_p: Probability of grayscale.
        blur_p: Probability of Gaussian blur.
        blur_sigma: Blur sigma range.
    """

    def __init__(
        self,
        size: int = 224,
        shift: int = 32,
        scale: tuple[float, float] = (0.2, 1.0),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if shift < 1:
            raise ValueError(f"shift must be >= 1, got {shift}")
        self.size = size
        self.shift = shift
        self.base = v2.Compose(
            [
                v2.RandomResizedCrop(
                    size + shift, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(0.5),
            ]
        )
        brightness, contrast, saturation, hue = color_jitter
        self.color = v2.Compose(
            [
                v2.RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=color_jitter_p),
                v2.RandomGrayscale(grayscale_p),
                v2.RandomApply([GaussianBlur(_blur_kernel(size), sigma=blur_sigma)], p=blur_p),
            ]
        )

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        base = self.base(image)
        dy, dx = torch.randint(0, self.shift, (2,)).tolist()
        online = base[:, : self.size, : self.size]
        target = base[:, dy : dy + self.size, dx : dx + self.size]
        return {"images": online.contiguous(), "target_images": self.color(target).contiguous()}


class MAEViews:
    """MAE's single view: random resized crop (scale (0.2, 1), bicubic) and horizontal flip.

    Args:
        size: Output side in pixels.
        scale: Crop area range.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(0.5),
            ]
        )

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        return {"images": self.transform(image)}


class TwoCropViews:
    """Two independently augmented views of one image (BYOL's asymmetric augmentations, MoCo v3).

    Each view: random resized crop (scale (0.08, 1); bilinear, torchvision's default, as in MoCo v3's
    code), colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur, horizontal
    flip. The first view is always blurred and never solarised; the second is blurred with p=0.1 and
    solarised with p=0.2 (BYOL, as used by MoCo v3).

    Args:
        size: Output side in pixels.
        scale: Crop area range.
        color_jitter: Brightness, contrast, saturation, hue strengths.
        blur_p: Blur probabilities of the two views.
        solarize_p: Solarisation probabilities of the two views.
        interpolation: Resampling of the crops: ``"bilinear"`` (MoCo v3) or ``"bicubic"``.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        blur_p: tuple[float, float] = (1.0, 0.1),
        solarize_p: tuple[float, float] = (0.0, 0.2),
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
    ) -> None:
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"TwoCropViews(interpolation={interpolation!r}): must be 'bilinear' or 'bicubic'")
        brightness, contrast, saturation, hue = color_jitter
        resample = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
        self.interpolation = interpolation

        def view(blur: float, solarize: float) -> v2.Compose:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=scale, interpolation=resample, antialias=True),
                    v2.RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=0.8),
                    v2.RandomGrayscale(0.2),
                    v2.RandomApply([GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur),
                    v2.RandomSolarize(threshold=128, p=solarize),
                    v2.RandomHorizontalFlip(0.5),
                ]
            )

        self.first = view(blur_p[0], solarize_p[0])
        self.second = view(blur_p[1], solarize_p[1])

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        return {"images": self.first(image), "images_2": self.second(image)}


class ClassificationViews:
    """Fine-tuning augmentation: random resized crop (bicubic), horizontal flip and RandAugment.

    Random erasing and mixup/cutmix act on the normalised batch on the device (see
    :class:`~lightning_mim.FineTuneModule`). torchvision's RandAugment draws a fixed magnitude;
    the official recipes' "m9-mstd0.5" (timm) jitters it per image, which this does not.

    Args:
        size: Output side in pixels.
        scale: Crop area range.
        randaugment: (number of ops, magnitude) or None to disable.
    """

    def __init__(
        self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0), randaugment: tuple[int, int] | None = (2, 9)
    ) -> None:
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(0.5),
        ]
        if randaugment is not None:
            steps.append(v2.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1]))
        self.transform = v2.Compose(steps)

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        return {"images": self.transform(image)}
