"""Image datasets that yield uint8 tensors and survive broken files."""

from __future__ import annotations

import io
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


def decode_rgb_bytes(data: bytes | bytearray | memoryview) -> Tensor:
    """Encoded image bytes as uint8 RGB (3, H, W); grayscale, RGBA, CMYK and palettes are converted.

    libjpeg-turbo/libpng through torchvision first, Pillow for the formats torchvision lacks. A 16-bit
    PNG is reduced to 8 bits and an animated GIF to its first frame, so every image suits the views.

    Raises:
        ValueError: ``data`` is empty.
        OSError: Neither decoder reads it (truncated, not an image, unknown format).
    """
    if not len(data):
        raise ValueError("empty file")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
            image = pil_to_tensor(img.convert("RGB"))
    if image.ndim == 4:  # an animated GIF: (frames, 3, H, W)
        image = image[0]
    if image.dtype == torch.uint16:  # a 16-bit PNG
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def decode_rgb(path: str | Path) -> Tensor:
    """Reads an image file as uint8 RGB (3, H, W), as :func:`decode_rgb_bytes`."""
    return decode_rgb_bytes(Path(path).read_bytes())


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


def _where(path: Path) -> str:
    """``path`` as given, plus its absolute form when it is relative (the working directory may surprise)."""
    return str(path) if path.is_absolute() else f"{path} (absolute: {path.absolute()})"


class ImageFolderDataset(Dataset):
    """Images under ``root``: ``root/<class>/**/<image>`` (labels) or images directly in ``root`` (label -1).

    Items are ``transform(image)`` (a dict of uint8 views) plus ``"labels"``; keys are indices or
    :class:`~lightning_mim.data.ResumableSampler`'s ``(index, view_seed)`` pairs.

    A file that cannot be decoded (truncated, empty, not an image) is replaced by the next readable
    image, so a run never stops on one bad file. It is named in a warning and counted in
    ``num_skipped`` once per run: one flag per file, in shared memory allocated here, before the data
    loader starts its workers, records which files are known to be unreadable, so every worker and
    every epoch sees them (and skips them without decoding them again). Copies made by
    :meth:`with_transform` share the flags. Each process that builds the dataset (each DDP rank) has
    its own flags.

    The constructor decodes files in order until one succeeds, so a folder without a single readable
    image fails here, not at the first batch.

    Args:
        root: Folder of images.
        transform: View transform, uint8 (3, H, W) -> dict of tensors.
        extensions: File endings counted as images (case-insensitive).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: No file under ``root`` has an image ending, or none of them decodes.
    """

    def __init__(self, root: str | Path, transform: ViewFn, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {_where(self.root)}")
        self.classes, self.samples = _scan(self.root, extensions)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(extensions)}) found under {_where(self.root)}")
        self.transform = transform
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # (M,)
        if not any(self._decode(i) is not None for i in range(len(self.samples))):  # stops at the first success
            raise ValueError(
                f"no readable image under {_where(self.root)}: tried all {len(self.samples)} image files and none "
                "decodes (each is named in a warning above)"
            )

    def with_transform(self, transform: ViewFn) -> ImageFolderDataset:
        """The same files (no re-scan) under another transform."""
        clone = object.__new__(ImageFolderDataset)
        clone.__dict__.update(self.__dict__)
        clone.transform = transform
        return clone

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable files have been met so far (all workers). O(files): poll it sparingly."""
        return int(torch.count_nonzero(self._unreadable))

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Tensor | None:
        """Sample ``index``'s image, or None when its file is unreadable (flagged, and named the first time)."""
        if self._unreadable[index]:
            return None
        path = self.samples[index][0]
        try:
            return decode_rgb(path)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
            # check-and-set before warning: a worker that meets the file later sees the flag
            if not self._unreadable[index]:
                self._unreadable[index] = True
                warnings.warn(f"skipping unreadable image {path}: {err}", RuntimeWarning, stacklevel=3)
            return None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        index, seed = split_key(key)  # a ResumableSampler key seeds the views
        for offset in range(len(self.samples)):
            sample = (index + offset) % len(self.samples)
            image = self._decode(sample)
            if image is None:
                continue
            out = apply_seeded(self.transform, image, seed)
            out["labels"] = torch.tensor(self.samples[sample][1])
            return out
        raise RuntimeError(f"no readable image under {_where(self.root)}")


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
