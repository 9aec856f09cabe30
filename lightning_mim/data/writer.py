"""Writing image folders as litdata chunks: what ``lightning-mim prepare-data`` runs.

:func:`prepare_streaming_data` checks that every image decodes and writes it with
`litdata <https://github.com/Lightning-AI/litData>`_'s ``optimize`` as
``{"image": <the file's encoded bytes, unchanged>, "label": int, "id": int}``: no decoded arrays,
so the chunks are about as large as the JPEGs. :class:`~lightning_mim.data.StreamingDataModule`
(:mod:`lightning_mim.data.streaming`) reads them.

Needs the ``streaming`` extra: ``pip install "lightning-mim[streaming]"``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import litdata
    from litdata.processing.utilities import read_index_file_content
    from litdata.streaming.resolver import _resolve_dir
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('lightning_mim.data.writer needs litdata: pip install "lightning-mim[streaming]"') from err

from lightning_mim.data.folder import IMAGE_EXTENSIONS, _scan, _where, decode_rgb_bytes

__all__ = ["PreparedSplit", "prepare_streaming_data"]


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
