r"""Streaming pre-training data: image folders written as litdata chunks, streamed from disk or a bucket.

    lightning-mim prepare-data /data/imagenet /data/imagenet-chunks          # or s3://bucket/imagenet
    lightning-mim fit --config configs/conmim_vitb.yaml \\
        --data.class_path lightning_mim.data.StreamingDataModule --data.init_args.input_dir /data/imagenet-chunks

:func:`prepare_streaming_data` (``lightning-mim prepare-data``; :mod:`lightning_mim.data.writer`)
writes every image that decodes as ``{"image": <the file's encoded bytes>, "label": int, "id": int}``
with `litdata <https://github.com/Lightning-AI/litData>`_'s ``optimize``. :class:`StreamingDataModule`
(this module) streams them through litdata's ``StreamingDataset`` / ``StreamingDataLoader`` from a
local folder or an object-store URL (``s3://``, ``gs://``, ``azure://``, ...) and gives the method
the same batches as :class:`~lightning_mim.data.ImageNetDataModule`: uint8 views from
``pl_module.train_views()`` plus ``labels`` (and ``ids``).

Order, sharding and resume are litdata's: each epoch permutes the chunks and the items inside each
chunk from (seed, epoch), deals them to ranks and then workers in whole batches, and the loader's
``state_dict`` (which Lightning saves in every checkpoint) records how many batches were consumed, so
a run resumed mid-epoch continues with the next batch. Each image's views are drawn under a seed
derived from (seed, epoch, id), so they do not depend on which worker decodes it either.

Needs the ``streaming`` extra: ``pip install "lightning-mim[streaming]"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

try:
    import litdata
    from litdata.utilities.env import _DistributedEnv
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('lightning_mim.data.streaming needs litdata: pip install "lightning-mim[streaming]"') from err

from lightning_mim._rng import Stream, mix_seed, stream_seed
from lightning_mim.data.datamodule import _ViewsDataModule, watch_epoch_boundary
from lightning_mim.data.folder import _where, decode_rgb_bytes
from lightning_mim.data.sampling import apply_seeded
from lightning_mim.data.writer import PreparedSplit, _join, prepare_streaming_data

__all__ = [
    "PreparedSplit",  # the writer's names (lightning_mim.data.writer) stay importable from here
    "StreamingDataModule",
    "StreamingImageDataset",
    "prepare_streaming_data",
]

ViewFn = Callable[[Tensor], dict[str, Tensor]]


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
        self._view_base = stream_seed(Stream.VIEWS, base=seed)

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
