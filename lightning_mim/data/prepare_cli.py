"""``lightning-mim prepare-data SRC DST``: the command line of :func:`~lightning_mim.data.prepare_streaming_data`.

Needs the ``streaming`` extra: ``pip install "lightning-mim[streaming]"``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_mim.data.writer import prepare_streaming_data

__all__ = ["prepare_data_main"]


def prepare_data_main(argv: Sequence[str]) -> None:
    """``lightning-mim prepare-data SRC DST``: an image folder as litdata chunks, with a summary."""
    parser = argparse.ArgumentParser(
        prog="lightning-mim prepare-data",
        description=(
            "Write an image folder (ImageFolder layout, labels optional) as litdata chunks for "
            "lightning_mim.data.StreamingDataModule: SRC/train and SRC/val become DST/train and DST/val; "
            "a folder without them becomes DST/train. Images are stored as their encoded bytes."
        ),
    )
    parser.add_argument("src", help="image folder")
    parser.add_argument("dst", help="output folder or object-store URL (s3://bucket/prefix, gs://..., ...)")
    parser.add_argument("--train-dir", default="train", help="training sub-folder of SRC (default: train)")
    parser.add_argument("--val-dir", default="val", help="validation sub-folder of SRC (default: val)")
    parser.add_argument("--num-workers", type=int, default=None, help="writer processes (default: CPU cores)")
    parser.add_argument("--chunk-bytes", default="64MB", help="target chunk size (default: 64MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace chunks already at DST")
    parser.add_argument(
        "--scan-order", action="store_true", help="write the images in folder order (default: a fixed random order)"
    )
    parser.add_argument("--verbose", action="store_true", help="show litdata's progress")
    options = parser.parse_args(list(argv))
    try:
        summary = prepare_streaming_data(
            options.src,
            options.dst,
            train_dir=options.train_dir,
            val_dir=options.val_dir,
            num_workers=options.num_workers,
            chunk_bytes=options.chunk_bytes,
            overwrite=options.overwrite,
            shuffle=not options.scan_order,
            verbose=options.verbose,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"lightning-mim prepare-data: error: {err}\n")
    for name, split in summary.items():
        labels = f"{split.classes} classes" if split.classes else "no labels"
        print(
            f"{name}: {split.images} images ({split.skipped} unreadable skipped, {labels}) from {split.source} "
            f"-> {split.output}: {split.chunks} chunks, {split.nbytes / 1e6:.1f} MB, {split.seconds:.1f} s"
        )
    print(
        "stream it with: lightning-mim fit --config CONFIG --data.class_path "
        f"lightning_mim.data.StreamingDataModule --data.init_args.input_dir {options.dst}"
    )
