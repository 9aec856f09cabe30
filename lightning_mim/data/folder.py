"""Image datasets that yield uint8 tensors and survive broken files."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor

from lightning_mim.data.sampling import apply_seeded, split_key

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "TensorImageDataset", "decode_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
ViewFn = Callable[[Tensor], dict[str, Tensor]]


def decode_rgb(path: str | Path) -> Tensor:
    """Reads an image file as uint8 RGB (3, H, W); grayscale, RGBA, CMYK and palettes are converted.

    libjpeg-turbo/libpng through torchvision first, Pillow for the formats torchvision lacks.
    """
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("empty file")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img.convert("RGB"))


def _scan(root: Path, extensions: tuple[str, ...]) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders (sorted) and (path, label) samples; files directly in ``root`` get label -1."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    samples: list[tuple[str, int]] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower().endswith(extensions):
            samples.append((entry.path, -1))
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if f.lower().endswith(extensions)]
    return classes, samples


class ImageFolderDataset(Dataset):
    """Images under ``root``: ``root/<class>/**/<image>`` (labels) or images directly in ``root`` (label -1).

    Items are ``transform(image)`` (a dict of uint8 views) plus ``"labels"``; keys are indices or
    :class:`~lightning_mim.data.ResumableSampler`'s ``(index, view_seed)`` pairs. A file that cannot be
    decoded is reported once per worker in a warning naming it, counted in ``num_skipped`` (shared
    across worker processes), and replaced by the next readable image, so a run never stops on one
    bad file.

    Args:
        root: Folder of images.
        transform: View transform, uint8 (3, H, W) -> dict of tensors.
        extensions: File endings counted as images (case-insensitive).
    """

    def __init__(self, root: str | Path, transform: ViewFn, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes, self.samples = _scan(self.root, extensions)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(extensions)}) found under {self.root}")
        self.transform = transform
        self._num_skipped = torch.zeros((), dtype=torch.int64).share_memory_()
        self._reported: set[str] = set()

    def with_transform(self, transform: ViewFn) -> ImageFolderDataset:
        """The same files (no re-scan) under another transform."""
        clone = object.__new__(ImageFolderDataset)
        clone.__dict__.update(self.__dict__)
        clone.transform = transform
        return clone

    @property
    def num_skipped(self) -> int:
        """How many unreadable files have been met so far (all workers)."""
        return int(self._num_skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        index, seed = split_key(key)  # a ResumableSampler key seeds the views
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = decode_rgb(path)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
                self._num_skipped += 1
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {err}", RuntimeWarning, stacklevel=2)
                continue
            out = apply_seeded(self.transform, image, seed)
            out["labels"] = torch.tensor(label)
            return out
        raise RuntimeError(f"no readable image under {self.root}")


class TensorImageDataset(Dataset):
    """Decoded uint8 images held in memory, (M, 3, H, W), with labels (M,).

    Keys are indices or :class:`~lightning_mim.data.ResumableSampler`'s ``(index, view_seed)`` pairs.

    Args:
        images: uint8 images.
        labels: Integer labels (-1 for none).
        transform: View transform, uint8 (3, H, W) -> dict of tensors.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: ViewFn) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("expected uint8 images (M, C, H, W) and M labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def with_transform(self, transform: ViewFn) -> TensorImageDataset:
        return TensorImageDataset(self.images, self.labels, transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        index, seed = split_key(key)  # a ResumableSampler key seeds the views
        out = apply_seeded(self.transform, self.images[index], seed)
        out["labels"] = self.labels[index]
        return out
