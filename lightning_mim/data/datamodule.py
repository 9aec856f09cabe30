"""Data modules: an image folder (ImageNet layout) and the bundled sample set."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg
from typing_extensions import override

from lightning_mim._rng import _MOD
from lightning_mim.data.folder import ImageFolderDataset, TensorImageDataset, _where
from lightning_mim.data.sampling import ResumableSampler

__all__ = ["ImageNetDataModule", "SampleDataModule"]

ViewFn = Callable[[Tensor], dict[str, Tensor]]
SAMPLE_FILE = Path(__file__).parent / "sample" / "cifar10_sample.pt"


class _Viewed(Protocol):
    def with_transform(self, transform: ViewFn) -> Any: ...
    def __len__(self) -> int: ...


class _ViewsDataModule(pl.LightningDataModule):
    """Loaders over a train / val split pair; the method module supplies the view transforms.

    Training items are the method's views (``pl_module.train_views()``, e.g. ``images`` and
    ``teacher_images``) plus ``labels``; validation items and the kNN bank use
    ``pl_module.eval_views()``. Pass ``train_views`` / ``eval_views`` to override them.

    The training order and the views are drawn by a :class:`ResumableSampler` from the run seed (rank
    0's, shared by all ranks), the epoch and the sample index. The data module's state in a
    checkpoint records the epoch and how many batches of it were consumed, so a run resumed from any
    checkpoint, mid-epoch included, continues with exactly the batches the uninterrupted run would
    have seen. (Resuming on a different number of ranks or batch size restarts the interrupted
    epoch's order from its beginning, with a warning.)
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        train_views: ViewFn | None,
        eval_views: ViewFn | None,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_views = train_views
        self.eval_views = eval_views
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._bank: Dataset | None = None
        self.seed: int | None = None  # the data seed, set in setup() from the run seed
        self._resume: dict[str, int] | None = None

    def _sources(self) -> tuple[_Viewed, _Viewed | None]:
        """The train and (optional) val datasets, transform not yet chosen."""
        raise NotImplementedError

    def _views(self, name: str) -> ViewFn:
        chosen = getattr(self, name)
        if chosen is not None:
            return chosen
        module = self.trainer.lightning_module if self.trainer is not None else None
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ValueError(
                f"no {name} given: pass `{name}` to the data module or use a LightningModule with a {name}() method"
            )
        return factory()

    def setup(self, stage: str) -> None:
        if self.seed is None:
            seed = torch.initial_seed() % _MOD  # the run seed after seed_everything
            self.seed = int(self.trainer.strategy.broadcast(seed, src=0)) if self.trainer is not None else seed
        train, val = self._sources()
        self.train_set = train.with_transform(self._views("train_views"))
        eval_views = self._views("eval_views")
        self._bank = train.with_transform(eval_views)
        self.val_set = val.with_transform(eval_views) if val is not None else None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = None
        if train:
            world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed or 0)
            if self._resume is not None:
                self._apply_resume(sampler, world_size)
        return (_ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        if self.trainer is not None:
            watch_epoch_boundary(self.trainer)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.val_set, train=False) if self.val_set is not None else []

    def _apply_resume(self, sampler: ResumableSampler, world_size: int) -> None:
        state, self._resume = self._resume, None
        assert state is not None
        if state["world_size"] != world_size or state["batch_size"] != self.batch_size:
            warnings.warn(
                f"resuming with {world_size} ranks x batch {self.batch_size} instead of the checkpoint's "
                f"{state['world_size']} x {state['batch_size']}: epoch {state['epoch']} restarts its sample order "
                "from the beginning",
                RuntimeWarning,
                stacklevel=3,
            )
            sampler.set_epoch(state["epoch"])
            return
        sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Where the training data stands: the data seed, the epoch and the batches of it already consumed."""
        if self.trainer is None or self.seed is None:
            return {}
        return {
            "seed": self.seed,
            "epoch": self.trainer.current_epoch,
            "batches_done": _batches_done(self.trainer),
            "batch_size": self.batch_size,
            "world_size": self.trainer.world_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.seed = int(state_dict["seed"])
        self._resume = {k: int(state_dict[k]) for k in ("epoch", "batches_done", "batch_size", "world_size")}

    def knn_datasets(self) -> tuple[Dataset, Dataset] | None:
        """(bank, queries) for :class:`~lightning_mim.callbacks.OnlineKNN`: train and val images, eval view."""
        if self._bank is None or self.val_set is None:
            return None
        return self._bank, self.val_set


class _ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it is resumable mid-epoch.

    The position lives in the data module's state (see :class:`_ViewsDataModule`), which knows how many
    batches the training loop consumed; the loader itself would count the batch Lightning prefetches.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def forget_finished_epoch(trainer: pl.Trainer) -> None:
    """Starts the batch count of a resumed run's new epoch at 0 when its checkpoint was written after an epoch ended.

    A step-limited run (``max_steps``) that stopped at an epoch boundary (``trainer.should_stop`` set in
    ``on_train_epoch_end``, as ``EarlyStopping`` and ``Timer`` do) saves the finished epoch's batch count
    with the loop state. Lightning resumes such a run as "restarting" and keeps that count for the next
    epoch, so with a resumable loader (ours continue exactly where the data stood: the start of the
    next epoch) the next epoch would end after its last ``len - count`` batches. A no-op unless the
    restored epoch is complete and its batch count was carried over. Runs in ``on_train_start``: after
    Lightning restores the loops, before the epoch loop starts.
    """
    loop = trainer.fit_loop
    epoch: Any = loop.epoch_progress.current  # a _ProcessedTracker: ready, started, processed, completed
    batches = loop.epoch_loop.batch_progress.current
    finished = epoch.ready == epoch.started == epoch.processed == epoch.completed
    # A checkpoint written at the end of an epoch's last training batch is Lightning's own case: its
    # epoch loop completes that batch and resets the count itself.
    on_batch_end = getattr(loop.epoch_loop, "restarted_on_train_batch_end", False)  # Lightning >= 2.5
    if loop.restarting and finished and batches.ready > 0 and not on_batch_end:
        loop.epoch_loop.batch_progress.reset_on_run()
        loop.epoch_loop.scheduler_progress.reset_on_run()
        loop.epoch_loop.automatic_optimization.optim_progress.reset_on_run()


class _EpochBoundaryResume(pl.Callback):
    """Installed by the data modules on their trainer: :func:`forget_finished_epoch` when training starts."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        forget_finished_epoch(trainer)


def watch_epoch_boundary(trainer: pl.Trainer) -> None:
    """Adds :class:`_EpochBoundaryResume` to ``trainer`` once (a data module has no training hooks of its own)."""
    callbacks = getattr(trainer, "callbacks", None)
    if isinstance(callbacks, list) and not any(isinstance(c, _EpochBoundaryResume) for c in callbacks):
        callbacks.append(_EpochBoundaryResume())


def _batches_done(trainer: pl.Trainer) -> int:
    """Training batches of the current epoch whose optimizer step is in the weights being saved."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    if progress.completed >= trainer.num_training_batches:  # saved at the end of the epoch
        return 0
    return int(getattr(progress, "processed", progress.completed))


class ImageNetDataModule(_ViewsDataModule):
    """Images in the ImageFolder layout: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Any folder of images works for pre-training: when ``root/<train_dir>`` does not exist, ``root``
    itself is the training set (class sub-folders optional; labels are -1 without them) and there is
    no validation. Workers decode to uint8 and apply the views.

    Unreadable files (truncated, empty, not images) are skipped: each is named once in a warning and
    counted in :attr:`num_skipped` (see :class:`ImageFolderDataset`; under DDP, once per rank that
    meets it). During fitting the count is logged as ``data/skipped_images`` (rank zero's) when it
    changes, and a warning sums it up when training ends.
    :meth:`setup` fails with the path when ``root`` is missing and with the folder and the number of
    files tried when a folder holds no readable image.

    Args:
        root: Dataset root.
        batch_size: Images per device per step (global batch = batch_size x devices x nodes x
            accumulate_grad_batches).
        num_workers: Loader processes per device.
        train_dir: Training sub-folder.
        val_dir: Validation sub-folder (skipped if absent).
        train_views: Training view transform; default: the method's ``train_views()``.
        eval_views: Evaluation transform; default: the method's ``eval_views()``.
        pin_memory: Pin host memory when CUDA is available.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 64,
        num_workers: int = 8,
        train_dir: str = "train",
        val_dir: str = "val",
        train_views: ViewFn | None = None,
        eval_views: ViewFn | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, train_views, eval_views, pin_memory)
        self.root = Path(root).expanduser()
        self.train_dir = train_dir
        self.val_dir = val_dir
        self._scanned: tuple[ImageFolderDataset, ImageFolderDataset | None] | None = None

    def _sources(self) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
        if self._scanned is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"data root not found: {_where(self.root)}")
            train_root = self.root / self.train_dir
            if not train_root.is_dir():
                train_root = self.root
            val_root = self.root / self.val_dir
            identity: ViewFn = lambda image: {"images": image}  # noqa: E731 - replaced in setup()
            val = ImageFolderDataset(val_root, identity) if val_root.is_dir() and train_root != self.root else None
            self._scanned = (ImageFolderDataset(train_root, identity), val)
        return self._scanned

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer is None:
            return
        callbacks: list[pl.Callback] = self.trainer.callbacks  # type: ignore[attr-defined] # set at Trainer init
        if not any(isinstance(c, _SkippedImagesLogger) and c.data is self for c in callbacks):
            # a callback, not this module's on_after_batch_transfer: overriding that batch hook here
            # would silently replace the LightningModule's own
            callbacks.append(_SkippedImagesLogger(self))

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files (training and validation) met so far by this process and its workers."""
        return sum(d.num_skipped for d in (self.train_set, self.val_set) if isinstance(d, ImageFolderDataset))


class _SkippedImagesLogger(pl.Callback):
    """Puts an :class:`ImageNetDataModule`'s count of skipped files in the training log.

    Added to the trainer by :meth:`ImageNetDataModule.setup`. Logs ``data/skipped_images`` (distinct
    unreadable files met so far on this rank) to the trainer's loggers when the count has changed,
    checked every ``log_every_n_steps`` training batches and at the end of every epoch, and warns a
    summary on rank zero when training ends. It reads the datasets' shared CPU flags in the main
    process: no device synchronisation.
    """

    def __init__(self, data: ImageNetDataModule) -> None:
        self.data = data
        self.count = 0

    def _update(self, trainer: pl.Trainer) -> None:
        count = self.data.num_skipped
        if count != self.count:
            self.count = count
            for logger in trainer.loggers:
                logger.log_metrics({"data/skipped_images": float(count)}, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % max(1, getattr(trainer, "log_every_n_steps", 1)) == 0:
            self._update(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(trainer)
        if self.count:
            rank_zero_warn(
                f"{self.count} unreadable image files under {self.data.root} were skipped and replaced by readable "
                "ones (each is named in an earlier warning; logged as data/skipped_images)"
            )


def load_sample(split: str) -> tuple[Tensor, Tensor, list[str]]:
    """A bundled sample split as uint8 images (M, 3, 32, 32), labels (M,) and class names.

    ``"train"`` has 9,000 images, ``"test"`` 1,000.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    payload = torch.load(SAMPLE_FILE, weights_only=True)
    data, offsets = payload[f"{split}_bytes"], payload[f"{split}_offsets"].tolist()
    encoded = [data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    images = torch.stack(decode_jpeg(encoded))
    return images, payload[f"{split}_labels"], list(payload["classes"])


class SampleDataModule(_ViewsDataModule):
    """The bundled real image sample: 10,000 CIFAR-10 images (32 px), class balanced, offline.

    9,000 training images (900 per class) and 1,000 test images (100 per class) used as the
    validation split; see ``lightning_mim/data/sample/SOURCE.md`` for provenance. Decoded once into
    memory (30 MB). For the quickstart, the tests and the examples.

    Args:
        batch_size: Images per device per step.
        num_workers: Loader processes per device.
        train_size: Use only the first ``train_size`` training images (None: all).
        val_size: Use only the first ``val_size`` test images (None: all).
        train_views: Training view transform; default: the method's ``train_views()``.
        eval_views: Evaluation transform; default: the method's ``eval_views()``.
        pin_memory: Pin host memory when CUDA is available.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 2,
        train_size: int | None = None,
        val_size: int | None = None,
        train_views: ViewFn | None = None,
        eval_views: ViewFn | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, train_views, eval_views, pin_memory)
        self.train_size = train_size
        self.val_size = val_size
        self._loaded: tuple[TensorImageDataset, TensorImageDataset] | None = None

    def _sources(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        if self._loaded is None:
            identity: ViewFn = lambda image: {"images": image}  # noqa: E731 - replaced in setup()
            splits = []
            for split, size in (("train", self.train_size), ("test", self.val_size)):
                images, labels, _ = load_sample(split)
                # An evenly spaced subset keeps the classes balanced (the file is sorted by class).
                keep = torch.linspace(0, len(images) - 1, size).long() if size else slice(None)
                splits.append(TensorImageDataset(images[keep].contiguous(), labels[keep].contiguous(), identity))
            self._loaded = (splits[0], splits[1])
        return self._loaded
