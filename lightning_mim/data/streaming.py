"""Streaming pre-training data: image folders written as litdata chunks, streamed from disk or a bucket.

    lightning-mim prepare-data /data/imagenet /data/imagenet-chunks          # or s3://bucket/imagenet
    lightning-mim fit --config configs/conmim_vitb.yaml \\
        --data.class_path lightning_mim.data.StreamingDataModule --data.init_args.input_dir /data/imagenet-chunks

:func:`prepare_streaming_data` (``lightning-mim prepare-data``) checks that every image decodes and
writes it with `litdata <https://github.com/Lightning-AI/litData>`_'s ``optimize`` as
``{"image": <the file's encoded bytes, unchanged>, "label": int, "id": int}``: no decoded arrays,
so the chunks are about as large as the JPEGs. :class:`StreamingDataModule` streams them through
litdata's ``StreamingDataset`` / ``StreamingDataLoader`` from a local folder or an object-store URL
(``s3://``, ``gs://``, ``azure://``, ...) and gives the method the same batches as
:class:`~lightning_mim.data.ImageNetDataModule`: uint8 views from ``pl_module.train_views()`` plus
``labels`` (and ``ids``).

Order, sharding and resume are litdata's: each epoch permutes the chunks and the items inside each
chunk from (seed, epoch), deals them to ranks and then workers in whole batches, and the loader's
``state_dict`` (which Lightning saves in every checkpoint) records how many batches were consumed, so
a run resumed mid-epoch continues with the next batch. Each image's views are drawn under a seed
derived from (seed, epoch, id), so they do not depend on which worker decodes it either.

Needs the ``streaming`` extra: ``pip install "lightning-mim[streaming]"``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

try:
    import litdata
    from litdata.processing.utilities import read_index_file_content
    from litdata.streaming.resolver import _resolve_dir
    from litdata.utilities.env import _DistributedEnv
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('lightning_mim.data.streaming needs litdata: pip install "lightning-mim[streaming]"') from err

from lightning_mim._rng import mix_seed, stream_seed
from lightning_mim.data.datamodule import _ViewsDataModule, watch_epoch_boundary
from lightning_mim.data.folder import IMAGE_EXTENSIONS, _scan, _where, decode_rgb_bytes
from lightning_mim.data.sampling import _VIEW_STREAM, apply_seeded

__all__ = [
    "PreparedSplit",
    "StreamingDataModule",
    "StreamingImageDataset",
    "prepare_streaming_data",
]

ViewFn = Callable[[Tensor], dict[str, Tensor]]


# ---------------------------------------------------------------------------------------------------
# prepare-data: image folder -> chunks


@dataclass(frozen=True)
class PreparedSplit:
    """What :func:`prepare_streaming_data` wrote for one split.

    Attributes:
        source: The image folder read.
        output: Where the chunks are (a folder or a URL).
        images: Images written.
        skipped: Files with an image ending that did not decode (named in warnings), not written.
        classes: Class sub-folders (labels 0..classes-1; images outside them have label -1).
        nbytes: Size of the chunks in bytes.
        chunks: Number of chunk files.
        seconds: Wall time of the split.
    """

    source: str
    output: str
    images: int
    skipped: int
    classes: int
    nbytes: int
    chunks: int
    seconds: float


def _encode(item: tuple[str, int, int]) -> dict[str, Any] | None:
    """The sample litdata writes for ``(path, label, id)``: the file's bytes, once they decode; None skips it."""
    path, label, index = item
    try:
        data = Path(path).read_bytes()
        decode_rgb_bytes(data)
    except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
        warnings.warn(f"skipping unreadable image {path}: {err}", RuntimeWarning, stacklevel=2)
        return None
    return {"image": data, "label": label, "id": index}


def _join(base: str, name: str) -> str:
    """``base/name`` for a folder or an object-store URL."""
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def prepare_streaming_data(
    src: str | Path,
    dst: str,
    train_dir: str = "train",
    val_dir: str = "val",
    num_workers: int | None = None,
    chunk_bytes: int | str = "64MB",
    overwrite: bool = False,
    shuffle: bool = True,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    storage_options: dict[str, Any] | None = None,
    verbose: bool = False,
) -> dict[str, PreparedSplit]:
    """Writes the images under ``src`` as litdata chunks under ``dst/train`` (and ``dst/val``).

    The layout is :class:`~lightning_mim.data.ImageNetDataModule`'s: when ``src/<train_dir>`` is a
    folder, it becomes ``dst/train`` and ``src/<val_dir>`` (if present) ``dst/val``; otherwise ``src``
    itself is the training set. Inside a split, images in class sub-folders get the sorted class
    index as label and images directly in the folder -1, and each image's ``id`` is its position in
    that scan (:class:`~lightning_mim.data.ImageFolderDataset`'s order). The images are written in
    a fixed random order: litdata shuffles chunks and the items inside each chunk, and a batch comes
    from one or two chunks, so chunks written in scan order would make every batch nearly one class.
    Every file is decoded once to check it; files that do not decode are named in a warning, counted
    and left out.

    Args:
        src: Image folder (ImageFolder layout or a flat folder of images).
        dst: Output folder or object-store URL (``s3://bucket/prefix``; credentials as for litdata).
        train_dir: Training sub-folder of ``src``.
        val_dir: Validation sub-folder of ``src`` (skipped if absent).
        num_workers: Writer processes (default: one per CPU core).
        chunk_bytes: Target chunk size, bytes or a string such as ``"64MB"`` (litdata's default; a few
            hundred ImageNet JPEGs per chunk).
        overwrite: Replace chunks already at the output (otherwise that is an error).
        shuffle: Write the images in a random order (seed 0); off: scan order.
        extensions: File endings counted as images (case-insensitive).
        storage_options: Object-store options passed to litdata (endpoint, credentials).
        verbose: Let litdata print its progress.

    Returns:
        The summary of each split written, by split name (``"train"``, ``"val"``).

    Raises:
        FileNotFoundError: ``src`` is not a folder.
        ValueError: A split has no image files, or none of them decodes.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {_where(src)}")
    splits = {"train": src}
    if (src / train_dir).is_dir():
        splits["train"] = src / train_dir
        if (src / val_dir).is_dir():
            splits["val"] = src / val_dir
    dst = dst if "://" in dst else str(Path(dst).expanduser())
    if isinstance(chunk_bytes, str) and chunk_bytes.isdigit():
        chunk_bytes = int(chunk_bytes)
    summary = {}
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        for name, folder in splits.items():
            summary[name] = _prepare_split(
                folder,
                _join(dst, name),
                num_workers,
                chunk_bytes,
                overwrite,
                shuffle,
                extensions,
                storage_options,
                verbose,
            )
    finally:  # litdata sets the global start method (spawn); the caller's DataLoaders keep theirs
        multiprocessing.set_start_method(start_method, force=True)
    return summary


def _prepare_split(
    folder: Path,
    output: str,
    num_workers: int | None,
    chunk_bytes: int | str,
    overwrite: bool,
    shuffle: bool,
    extensions: tuple[str, ...],
    storage_options: dict[str, Any] | None,
    verbose: bool,
) -> PreparedSplit:
    classes, samples = _scan(folder, extensions)
    if not samples:
        raise ValueError(f"no images ({', '.join(extensions)}) found under {_where(folder)}")
    start = time.perf_counter()
    inputs = [(path, label, index) for index, (path, label) in enumerate(samples)]
    if shuffle:
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0)).tolist()
        inputs = [inputs[i] for i in order]
    litdata.optimize(
        fn=_encode,
        inputs=inputs,
        output_dir=output,
        chunk_bytes=chunk_bytes,
        num_workers=min(num_workers or os.cpu_count() or 1, len(samples)),
        mode="overwrite" if overwrite else None,
        storage_options=storage_options or {},
        verbose=verbose,
        # fork: no re-import in each writer, and callers need no ``if __name__ == "__main__"`` guard
        start_method="fork" if sys.platform == "linux" else None,
    )
    index = read_index_file_content(_resolve_dir(output), storage_options or {})
    if index is None:
        raise RuntimeError(f"litdata wrote no index.json to {output} (see the errors above)")
    chunks = index["chunks"]
    written = sum(int(chunk["chunk_size"]) for chunk in chunks)
    if written == 0:
        raise ValueError(
            f"no readable image under {_where(folder)}: tried all {len(samples)} image files and none decodes"
        )
    return PreparedSplit(
        source=str(folder),
        output=output,
        images=written,
        skipped=len(samples) - written,
        classes=len(classes),
        nbytes=sum(int(chunk["chunk_bytes"]) for chunk in chunks),
        chunks=len(chunks),
        seconds=time.perf_counter() - start,
    )


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


# ---------------------------------------------------------------------------------------------------
# streaming


class StreamingImageDataset(litdata.StreamingDataset):
    """Chunks written by :func:`prepare_streaming_data`, decoded to uint8 and passed through ``views``.

    Items are ``views(image)`` (a dict of uint8 views) plus ``"labels"`` and ``"ids"``. Iterated
    (under litdata's ``StreamingDataLoader``) it yields this rank's share of the epoch in litdata's
    order; indexed (``dataset[i]``) it reads item ``i`` directly. The views are drawn in a forked RNG
    under a seed made of the dataset seed, the epoch (litdata's, counting from 1) and the image's
    ``id``, so an image's augmentation depends on those alone, not on the worker that decodes it.

    Args:
        input_dir: Folder or object-store URL of one split (``.../train``).
        views: View transform, uint8 (3, H, W) -> dict of tensors.
        shuffle: Shuffle chunks and the items inside them, anew each epoch.
        seed: Shuffling and view seed, in [0, 2**32); the same on every rank.
        drop_last: Give every rank and worker the same number of whole batches, leaving out the rest
            of the epoch (see :class:`StreamingDataModule`).
        world_size: Number of ranks the epoch is dealt to (default: litdata's detection from
            ``torch.distributed`` or the ``WORLD_SIZE`` / ``GLOBAL_RANK`` variables).
        rank: This process's global rank (with ``world_size``).
        num_nodes: Number of nodes (with ``world_size``).
        cache_dir: Where chunks streamed from a URL are cached (default: litdata's).
        max_cache_size: Cache budget, e.g. ``"100GB"`` (default: litdata's).
        storage_options: Object-store options passed to litdata (endpoint, credentials).
    """

    def __init__(
        self,
        input_dir: str,
        views: ViewFn,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        world_size: int | None = None,
        rank: int = 0,
        num_nodes: int = 1,
        cache_dir: str | None = None,
        max_cache_size: int | str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.input_path = input_dir  # as given (litdata's ``input_dir`` may point at its cache)
        self._options: dict[str, Any] = {
            "input_dir": input_dir,
            "shuffle": shuffle,
            "seed": seed,
            "drop_last": drop_last,
            "world_size": world_size,
            "rank": rank,
            "num_nodes": num_nodes,
            "cache_dir": cache_dir,
            "max_cache_size": max_cache_size,
            "storage_options": storage_options,
        }
        super().__init__(
            input_dir,
            cache_dir=cache_dir,
            shuffle=shuffle,
            seed=seed,
            max_cache_size=max_cache_size,
            storage_options=storage_options,
        )
        if world_size is not None:
            # litdata reads the ranks from the environment when the dataset is built; the trainer knows them
            self.distributed_env = _DistributedEnv(world_size=world_size, global_rank=rank, num_nodes=num_nodes)
        self.set_drop_last(drop_last)
        self.views = views
        self._view_base = stream_seed(_VIEW_STREAM, base=seed)

    def with_transform(self, views: ViewFn) -> StreamingImageDataset:
        """The same chunks and settings under other views."""
        return StreamingImageDataset(**{**self._options, "views": views})

    @override
    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if not isinstance(item, dict):  # a slice: raw items
            return item
        seed = mix_seed(self._view_base, self.current_epoch, int(item["id"]))
        out = apply_seeded(self.views, decode_rgb_bytes(item["image"]), seed)
        out["labels"] = torch.tensor(int(item["label"]))
        out["ids"] = torch.tensor(int(item["id"]))
        return out


class _Indexed(Dataset):
    """A :class:`StreamingImageDataset` read by index, for map-style loaders (validation, kNN bank)."""

    def __init__(self, dataset: StreamingImageDataset) -> None:
        self.dataset = dataset

    def with_transform(self, views: ViewFn) -> _Indexed:
        return _Indexed(self.dataset.with_transform(views))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.dataset[int(index)]


class StreamingDataModule(_ViewsDataModule):
    """Images written by ``lightning-mim prepare-data``, streamed from a folder or an object store.

    ``input_dir`` holds ``train/`` (and optionally ``val/``) as written by
    :func:`prepare_streaming_data`; a local ``input_dir`` that is itself one split (it holds
    ``index.json``) is the training set. URLs (``s3://bucket/prefix``, ``gs://...``, ``azure://...``)
    are streamed through litdata, which caches chunks under ``cache_dir``; give credentials and
    endpoints as litdata expects them (environment, or ``storage_options``).

    The training split is streamed by litdata's ``StreamingDataLoader``: each epoch permutes the
    chunks and the items within them from (seed, epoch) (the seed is the run seed, as in
    :class:`~lightning_mim.data.ImageNetDataModule`), and deals them to ranks and then loader workers
    in whole batches, so every image is seen at most once per epoch on exactly one rank. Every rank
    gets ``(N // batch_size) // world_size`` batches, all full; the up to
    ``batch_size * world_size - 1`` images left over are left out of that epoch (they come from the
    end of the epoch's last chunks, so which ones changes with the chunk order). Views are seeded per
    image from (seed, epoch, id), independent of the worker. Mid-epoch resume is litdata's: Lightning
    saves the loader's ``state_dict`` (epoch, batches consumed) in every checkpoint and restores it,
    and the resumed run continues with exactly the batches the uninterrupted run would have seen, when
    it resumes with the same number of ranks, workers and batch size (litdata restripes the rest of
    the epoch otherwise).

    Validation and the kNN bank (:class:`~lightning_mim.callbacks.OnlineKNN`) read the val and train
    splits by index with the evaluation views, sharded by Lightning like any map-style dataset.

    Args:
        input_dir: Folder or object-store URL holding the prepared splits.
        batch_size: Images per device per step.
        num_workers: Loader processes per device.
        train_dir: Training split under ``input_dir``.
        val_dir: Validation split under ``input_dir``; None: no validation. A local split that does
            not exist is skipped; one under a URL must exist.
        shuffle: Shuffle the training stream (off: chunk order, for debugging).
        cache_dir: Where chunks streamed from a URL are cached (default: litdata's).
        max_cache_size: Cache budget, e.g. ``"200GB"`` (default: litdata's).
        storage_options: Object-store options passed to litdata (endpoint, credentials).
        train_views: Training view transform; default: the method's ``train_views()``.
        eval_views: Evaluation transform; default: the method's ``eval_views()``.
        pin_memory: Pin host memory when CUDA is available.
    """

    def __init__(
        self,
        input_dir: str,
        batch_size: int = 64,
        num_workers: int = 8,
        train_dir: str = "train",
        val_dir: str | None = "val",
        shuffle: bool = True,
        cache_dir: str | None = None,
        max_cache_size: int | str | None = None,
        storage_options: dict[str, Any] | None = None,
        train_views: ViewFn | None = None,
        eval_views: ViewFn | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, train_views, eval_views, pin_memory)
        self.input_dir = str(Path(input_dir).expanduser()) if "://" not in input_dir else input_dir
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.storage_options = storage_options
        self._splits: tuple[_Indexed, _Indexed | None] | None = None

    def _split_dirs(self) -> tuple[str, str | None]:
        """Where the train and val chunks are."""
        train = _join(self.input_dir, self.train_dir)
        val = None if self.val_dir is None else _join(self.input_dir, self.val_dir)
        if "://" in self.input_dir:
            return train, val
        root = Path(self.input_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"streaming data not found: {_where(root)}")
        if not (Path(train) / "index.json").is_file():
            if not (root / "index.json").is_file():
                raise FileNotFoundError(
                    f"no litdata chunks (index.json) in {_where(Path(train))} or {_where(root)}: write them with "
                    "`lightning-mim prepare-data SRC DST`"
                )
            return self.input_dir, None
        return train, val if val is not None and (Path(val) / "index.json").is_file() else None

    def _dataset(self, input_dir: str, views: ViewFn, **kwargs: Any) -> StreamingImageDataset:
        return StreamingImageDataset(
            input_dir,
            views,
            cache_dir=self.cache_dir,
            max_cache_size=self.max_cache_size,
            storage_options=self.storage_options,
            **kwargs,
        )

    @override
    def _sources(self) -> tuple[_Indexed, _Indexed | None]:
        if self._splits is None:
            train, val = self._split_dirs()
            identity: ViewFn = lambda image: {"images": image}  # noqa: E731 - replaced in setup()
            # read by index on every rank: one "rank" holding everything (Lightning shards map-style loaders)
            single = {"world_size": 1, "rank": 0, "seed": (self.seed or 0) % 2**32}
            self._splits = (
                _Indexed(self._dataset(train, identity, **single)),
                _Indexed(self._dataset(val, identity, **single)) if val is not None else None,
            )
        return self._splits

    @override
    def train_dataloader(self) -> litdata.StreamingDataLoader:
        assert isinstance(self.train_set, _Indexed), "call setup() first"
        trainer = self.trainer
        if trainer is not None:
            watch_epoch_boundary(trainer)
        world_size, rank, num_nodes, epoch = (
            (trainer.world_size, trainer.global_rank, trainer.num_nodes, trainer.current_epoch)
            if trainer is not None
            else (1, 0, 1, 0)
        )
        dataset = self._dataset(
            self.train_set.dataset.input_path,
            self.train_set.dataset.views,
            shuffle=self.shuffle,
            seed=(self.seed or 0) % 2**32,  # the seed restored from a checkpoint, when resuming
            drop_last=True,
            world_size=world_size,
            rank=rank,
            num_nodes=num_nodes,
        )
        loader = litdata.StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )
        # the loader counts epochs from its creation and starts each iteration by adding one: a loader made
        # at a later epoch (``reload_dataloaders_every_n_epochs``) continues the count instead of repeating
        # epoch 1's order. A checkpoint's loader state, loaded after this, sets it when resuming.
        loader.current_epoch = epoch
        return loader

    @override
    def state_dict(self) -> dict[str, Any]:
        """The data seed; the stream position is in the training loader's state, which Lightning saves."""
        return {} if self.seed is None else {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.seed = int(state_dict["seed"])
