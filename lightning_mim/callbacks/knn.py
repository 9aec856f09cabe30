"""Online k-nearest-neighbour evaluation of an encoder during pre-training."""

from __future__ import annotations

from typing import Any, Protocol

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_mim._rng import Stream, make_generator

__all__ = ["OnlineKNN", "knn_predict"]


class _Embeds(Protocol):
    def embed(self, images: Tensor) -> Tensor: ...


@torch.no_grad()
def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN classification with cosine similarity (the DINO / InstDisc protocol).

    Each query takes its ``k`` most similar bank entries; each votes for its label with weight
    ``exp(similarity / temperature)``; the class with the largest total wins.

    Args:
        query: (Q, D) features.
        bank: (M, D) features of the labelled bank.
        bank_labels: (M,) integer labels.
        num_classes: Number of classes.
        k: Neighbours per query (capped at M).
        temperature: Vote temperature.
        chunk_size: Queries per similarity block (bounds memory at chunk_size x M).

    Returns:
        (Q,) predicted labels.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, query.shape[0], chunk_size):
        q = F.normalize(query[start : start + chunk_size].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=query.device)


class OnlineKNN(Callback):
    """kNN top-1 accuracy of the encoder's features, logged as ``val/knn_top1``.

    Evaluates once before training starts and after every validation epoch (set the frequency with
    the Trainer's ``check_val_every_n_epoch`` / ``val_check_interval``). Features of a labelled
    *bank* (the training images under the evaluation transform) and of labelled *queries* (the
    validation images) come from ``pl_module.embed(images)``, which takes a uint8 (B, C, H, W)
    batch and returns (B, D) features; each query is classified by :func:`knn_predict`.

    The datasets come from ``trainer.datamodule.knn_datasets()`` (lightning-mim's data modules
    provide it) unless given here; each item must be a dict with ``"images"`` and ``"labels"``.
    Under DDP each rank embeds a disjoint shard (no padding, no duplicates), the bank is gathered and
    correct counts are summed, so the accuracy equals a single-process run.

    Args:
        k: Number of neighbours.
        temperature: Vote temperature.
        bank_size: Use a fixed random subset of this many bank images (None: all).
        query_size: Use a fixed random subset of this many queries (None: all).
        batch_size: Batch size for embedding.
        num_workers: DataLoader workers for embedding.
        bank: Bank dataset, instead of the datamodule's.
        queries: Query dataset, instead of the datamodule's.
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        bank_size: int | None = None,
        query_size: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        bank: Dataset | None = None,
        queries: Dataset | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.temperature = temperature
        self.bank_size = bank_size
        self.query_size = query_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._bank = bank
        self._queries = queries
        self.history: list[tuple[int, float]] = []  # (global_step, top-1 accuracy in percent)
        self._disabled = False

    def _datasets(self, trainer: pl.Trainer) -> tuple[Dataset, Dataset] | None:
        if self._bank is not None and self._queries is not None:
            return self._bank, self._queries
        provider = getattr(getattr(trainer, "datamodule", None), "knn_datasets", None)
        datasets = provider() if callable(provider) else None
        if datasets is None:
            return None
        self._bank, self._queries = datasets
        return datasets

    def _subset(self, dataset: Dataset, size: int | None, stream: int) -> Dataset:
        n = len(dataset)  # type: ignore[arg-type]
        if size is None or size >= n:
            return dataset
        generator = make_generator(Stream.KNN_BANK + stream, rank=0, base=0)  # same subset on every rank and run
        return Subset(dataset, torch.randperm(n, generator=generator)[:size].tolist())

    def _embed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """Features and labels of this rank's shard (indices rank, rank + world, ...)."""
        shard = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))  # type: ignore[arg-type]
        loader = DataLoader(shard, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False)
        features, labels = [], []
        model: Any = pl_module
        for batch in loader:
            images = batch["images"].to(pl_module.device, non_blocking=True)
            with trainer.precision_plugin.forward_context():
                features.append(model.embed(images).float())
            labels.append(batch["labels"].to(pl_module.device))
        if not features:
            dim = int(
                model.embed(
                    torch.zeros(1, *dataset[0]["images"].shape, dtype=torch.uint8, device=pl_module.device)
                ).shape[1]
            )
            return torch.zeros(0, dim, device=pl_module.device), torch.zeros(
                0, dtype=torch.long, device=pl_module.device
            )
        return torch.cat(features), torch.cat(labels)

    def _gather(self, trainer: pl.Trainer, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if trainer.world_size == 1:
            return features, labels
        count = torch.tensor([features.shape[0]], device=features.device)
        counts = trainer.strategy.all_gather(count).view(-1)  # (world,)
        longest = int(counts.max())
        padded = F.pad(features, (0, 0, 0, longest - features.shape[0]))
        padded_labels = F.pad(labels, (0, longest - labels.shape[0]), value=-1)
        all_features = trainer.strategy.all_gather(padded).view(-1, longest, features.shape[1])
        all_labels = trainer.strategy.all_gather(padded_labels).view(-1, longest)
        keep = all_labels >= 0
        return all_features[keep], all_labels[keep]

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """Runs the kNN evaluation on every rank and returns top-1 accuracy in percent."""
        if self._disabled:
            return None
        datasets = self._datasets(trainer)
        if datasets is None or not callable(getattr(pl_module, "embed", None)):
            rank_zero_warn(
                "OnlineKNN is disabled: it needs `trainer.datamodule.knn_datasets()` (or bank/queries "
                "datasets) with labels and a LightningModule with `embed(images)`."
            )
            self._disabled = True
            return None
        bank_set = self._subset(datasets[0], self.bank_size, 0)
        query_set = self._subset(datasets[1], self.query_size, 1)
        was_training = pl_module.training
        pl_module.eval()
        try:
            bank, bank_labels = self._gather(trainer, *self._embed(trainer, pl_module, bank_set))
            query, query_labels = self._embed(trainer, pl_module, query_set)
        finally:
            pl_module.train(was_training)
        if bank_labels.numel() == 0 or bank_labels.min() < 0:
            rank_zero_warn("OnlineKNN is disabled: the bank images have no labels.")
            self._disabled = True
            return None
        num_classes = int(bank_labels.max()) + 1
        preds = knn_predict(query, bank, bank_labels, num_classes, self.k, self.temperature)
        stats = torch.stack([(preds == query_labels).sum(), torch.tensor(query.shape[0], device=preds.device)]).float()
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
        accuracy = float(100.0 * stats[0] / stats[1].clamp(min=1))
        self.history.append((trainer.global_step, accuracy))
        queries = int(stats[1])
        rank_zero_info(
            f"OnlineKNN: step {trainer.global_step}: kNN top-1 {accuracy:.2f}% ({queries} queries, k={self.k})"
        )
        return accuracy

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = self.evaluate(trainer, pl_module)
        if accuracy is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"val/knn_top1": accuracy}, step=trainer.global_step)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracy = self.evaluate(trainer, pl_module)
        if accuracy is not None:
            # The same value on every rank; sync_dist only keeps Lightning from warning under DDP.
            pl_module.log("val/knn_top1", accuracy, prog_bar=True, sync_dist=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(a)) for s, a in state_dict.get("history", [])]
