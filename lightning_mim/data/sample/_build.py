"""Rebuild the bundled sample set from a CIFAR-10 JPEG tree.

Usage: ``python -m lightning_mim.data.sample._build CIFAR_ROOT [OUT]`` where ``CIFAR_ROOT`` holds
``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``. The first ``--train-per-class`` and
``--test-per-class`` files of each class (sorted by name) are packed, byte for byte, into one file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def pack(root: Path, out: Path, train_per_class: int, test_per_class: int) -> None:
    """Packs the JPEG bytes of a class-balanced subset into ``out`` (loadable with weights_only)."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    payload: dict[str, object] = {"classes": classes}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        blobs: list[bytes] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            files = sorted((root / split / name).glob("*.jpg"))[:per_class]
            if len(files) < per_class:
                raise ValueError(f"{root / split / name} has {len(files)} images, {per_class} needed")
            blobs += [f.read_bytes() for f in files]
            labels += [label] * per_class
        lengths = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
        payload[f"{split}_bytes"] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        payload[f"{split}_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        payload[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    torch.save(payload, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).with_name("cifar10_sample.pt"))
    parser.add_argument("--train-per-class", type=int, default=900)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()
    pack(args.root, args.out, args.train_per_class, args.test_per_class)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
