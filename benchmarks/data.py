"""Images per second per data-loader worker of each method's view pipeline.

    python benchmarks/data.py                 # 300 ImageNet-sized JPEGs (written to a temp folder) + the sample
    python benchmarks/data.py --images 500 --folder /data/imagenet/train/n01440764

One process stands for one worker: it reads each file, decodes it once (``decode_rgb``) and applies
the method's training views at 224 px, returning uint8 tensors — exactly a worker's job in
``ImageNetDataModule``. Without ``--folder``, JPEGs of 400-500 px on a side (quality 90) are written
from the bundled sample images (bicubic upscaling plus mild noise, so they do not compress as flat
images). The bundled sample is measured too: its 32-px images are decoded once at load, so that row
is the view transforms alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lightning_mim._rng import mix_seed
from lightning_mim.data import (
    ClassificationViews,
    CMAEViews,
    ConMIMViews,
    ImageFolderDataset,
    MAEViews,
    TwoCropViews,
    load_sample,
)
from lightning_mim.data.folder import TensorImageDataset

ViewFactory = Callable[[int], Callable]
METHODS: dict[str, ViewFactory] = {
    "conmim (2 views)": lambda size: ConMIMViews(size=size),
    "cmae (2 views)": lambda size: CMAEViews(size=size, shift=max(4, size // 7)),
    "mae / mimco": lambda size: MAEViews(size=size),
    "mocov3 (2 crops)": lambda size: TwoCropViews(size=size),
    "cim": lambda size: MAEViews(size=size, scale=(0.08, 1.0)),
    "fine-tune (RandAugment)": lambda size: ClassificationViews(size=size),
}


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs of 400-500 px per side made from the bundled sample images."""
    images = load_sample("test")[0]
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = (int(v) for v in torch.randint(400, 501, (2,), generator=g))
        big = F.interpolate(images[i % len(images)][None].float(), size=(h, w), mode="bicubic", align_corners=False)
        big = (big + torch.randn(big.shape, generator=g) * 4).clamp(0, 255).to(torch.uint8)[0]
        Image.fromarray(big.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def rate(dataset: torch.utils.data.Dataset, count: int) -> float:
    """Items per second of ``dataset[(i, view_seed)]`` for ``count`` items (after 10 warm-up items).

    Keys carry a view seed, as :class:`~lightning_mim.data.ResumableSampler` yields them in training,
    so the per-image seeding is part of the measurement.
    """
    for i in range(10):
        dataset[(i, mix_seed(i))]
    start = time.perf_counter()
    for i in range(count):
        dataset[(i % len(dataset), mix_seed(i))]  # type: ignore[arg-type]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="JPEGs to write and read")
    parser.add_argument("--folder", type=Path, default=None, help="read this folder of images instead")
    parser.add_argument("--size", type=int, default=224, help="view size for the JPEGs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one thread
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "jpegs"
            write_jpegs(folder, args.images)
        sample_images, sample_labels, _ = load_sample("train")
        print(f"images/s per worker (1 thread); JPEGs from {folder}, views at {args.size} px; sample at 32 px")
        print(f"{'pipeline':<26}{'JPEG decode + views':>22}{'sample (views only)':>22}")
        for name, factory in METHODS.items():
            jpeg = ImageFolderDataset(folder, factory(args.size))
            sample = TensorImageDataset(sample_images, sample_labels, factory(32))
            print(f"{name:<26}{rate(jpeg, args.images):>22.0f}{rate(sample, 2000):>22.0f}")


if __name__ == "__main__":
    main()
