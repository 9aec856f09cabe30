"""Training-loader throughput: StreamingDataModule (litdata chunks) against ImageNetDataModule (files).

    python benchmarks/streaming.py                        # 1,000 JPEGs of 400-500 px, written to a temp folder
    python benchmarks/streaming.py --images 2000 --workers 1 2 4 --batch 64

Both modules read the same images: ``--images`` JPEGs written as ``benchmarks/data.py`` writes them
(400-500 px a side, quality 90, from the bundled sample), once as a folder of files for
ImageNetDataModule and once through ``prepare_streaming_data`` as litdata chunks (64 MB, local disk
standing in for the bucket) for StreamingDataModule. Each training loader decodes and applies MAE's
view (random resized crop to 224 px, flip) and collates uint8 batches, as in pre-training.

A row is images/s of whole epochs of the training loader, worker start-up included: the first
epoch (cold: worker start, first chunk or file opened) and the best of the following ones. The files
and chunks were just written, so both read from the page cache: this compares the loaders' own costs,
not the storage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from data import write_jpegs  # benchmarks/data.py (this folder is on sys.path when run as a script)

from lightning_mim.data import ImageNetDataModule, MAEViews, StreamingDataModule, prepare_streaming_data
from lightning_mim.data.datamodule import _ViewsDataModule


def epoch_rates(data: _ViewsDataModule, epochs: int) -> list[float]:
    """Images/s of each of ``epochs`` passes over ``data``'s training loader (worker start-up included)."""
    data.seed = 0
    data.setup("fit")
    loader = data.train_dataloader()
    rates = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += len(batch["images"])
        rates.append(images / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="JPEGs to write and read")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader workers to try")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader (the first is reported apart)")
    parser.add_argument("--size", type=int, default=224, help="view size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files, chunks = Path(tmp) / "files", Path(tmp) / "chunks"
        write_jpegs(files / "train", args.images)
        jpeg_bytes = sum(p.stat().st_size for p in (files / "train").iterdir())
        split = prepare_streaming_data(files, str(chunks), num_workers=max(args.workers))["train"]
        print(
            f"{args.images} JPEGs ({jpeg_bytes / 1e6:.1f} MB) -> {split.chunks} chunks ({split.nbytes / 1e6:.1f} MB) "
            f"in {split.seconds:.1f} s; MAE view at {args.size} px, batch {args.batch}, {torch.get_num_threads()} "
            "thread per process"
        )
        print(f"{'loader':<34}{'workers':>8}{'first epoch img/s':>20}{'later epochs img/s':>21}")
        for workers in args.workers:
            modules = {
                "ImageNetDataModule (files)": ImageNetDataModule(
                    files, batch_size=args.batch, num_workers=workers, pin_memory=False
                ),
                "StreamingDataModule (chunks)": StreamingDataModule(
                    str(chunks), batch_size=args.batch, num_workers=workers, pin_memory=False
                ),
            }
            for name, data in modules.items():
                data.train_views = data.eval_views = MAEViews(size=args.size)
                rates = epoch_rates(data, args.epochs)
                print(f"{name:<34}{workers:>8}{rates[0]:>20.0f}{max(rates[1:], default=rates[0]):>21.0f}")


if __name__ == "__main__":
    main()
