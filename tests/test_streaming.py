"""Streaming data: StreamingDataModule shards, shuffles and resumes the chunks prepare-data wrote.

A local folder stands in for the bucket. The chunks are the ``prepared`` fixture's (tests/conftest.py):
tests.helpers.write_sample_folder's bundled sample JPEGs (32 px), 200 training images in 10 classes
(plus one broken file) and 50 validation images, written by ``lightning-mim prepare-data``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchvision.transforms import v2

pytest.importorskip("litdata")

import litdata

from lightning_mim.callbacks import OnlineKNN
from lightning_mim.data import StreamingDataModule
from tests.helpers import FOLDER_TRAIN, FOLDER_VAL, CrashAt, cpu_trainer, tiny_method

ROOT = Path(__file__).resolve().parents[1]


def _crop(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Random 16-px crops and flips: the views depend on the RNG state they are drawn under."""
    return {"images": v2.RandomHorizontalFlip()(v2.RandomCrop(16)(image))}


def _epochs(
    dst: Path, batch_size: int, workers: int, seed: int = 5, epochs: int = 2, start: int = 0
) -> list[list[list[dict]]]:
    """For each epoch from ``start``, each of 2 ranks' batches, from one StreamingDataModule per rank."""
    loaders = []
    for rank in range(2):
        data = StreamingDataModule(
            str(dst), batch_size=batch_size, num_workers=workers, train_views=_crop, eval_views=_crop
        )
        trainer = SimpleNamespace(world_size=2, global_rank=rank, num_nodes=1, current_epoch=start)
        data.trainer = trainer  # type: ignore[assignment]
        data.seed = seed
        data.setup("fit")
        loaders.append(data.train_dataloader())
    return [[list(loader) for loader in loaders] for _ in range(epochs)]


def test_every_image_once_per_epoch_across_2_ranks_x_2_workers(prepared: tuple[Path, Path, str]) -> None:
    dst = prepared[1]
    run = _epochs(dst, batch_size=10, workers=2)
    orders = []
    for ranks in run:
        ids = [batch["ids"].tolist() for batches in ranks for batch in batches]
        assert [len(batches) for batches in ranks] == [10, 10]  # 200 images: 20 batches of 10, half per rank
        assert all(len(batch) == 10 for batch in ids)
        flat = [i for batch in ids for i in batch]
        assert sorted(flat) == sorted(set(flat)) and len(flat) == FOLDER_TRAIN  # each image exactly once
        orders.append(flat)
    assert orders[0] != orders[1]  # a new order every epoch ...
    classes = [len(set(batch["labels"].tolist())) for batches in run[0] for batch in batches]
    assert sum(classes) / len(classes) > 5  # written in random order: batches mix the 10 classes (6.5 expected)
    again = _epochs(dst, batch_size=10, workers=2)
    for ranks, ranks_again in zip(run, again, strict=True):  # ... the same one in every run with this seed
        for batches, batches_again in zip(ranks, ranks_again, strict=True):
            for a, b in zip(batches, batches_again, strict=True):
                assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["images"], b["images"])

    # views depend on (seed, epoch, image) only: one worker per rank deals the images differently, same views
    def views(run: list[list[list[dict]]]) -> dict[tuple[int, int], torch.Tensor]:
        return {
            (epoch, int(i)): image
            for epoch, ranks in enumerate(run)
            for batches in ranks
            for batch in batches
            for i, image in zip(batch["ids"], batch["images"], strict=True)
        }

    single = views(_epochs(dst, batch_size=10, workers=0))
    double = views(run)
    assert single.keys() == double.keys()
    assert all(torch.equal(single[key], double[key]) for key in single)
    assert not torch.equal(double[(0, 3)], double[(1, 3)])  # and change from epoch to epoch
    assert _epochs(dst, batch_size=10, workers=2, seed=6, epochs=1)[0][0][0]["ids"].tolist() != orders[0][:10]
    # a loader made at epoch 1 (reload_dataloaders_every_n_epochs) continues with epoch 1's order
    later = _epochs(dst, batch_size=10, workers=2, epochs=1, start=1)[0]
    assert [int(i) for batches in later for batch in batches for i in batch["ids"]] == orders[1]


def test_batch_size_that_does_not_divide_leaves_out_the_rest(prepared: tuple[Path, Path, str]) -> None:
    # 200 images, batch 8, 2 ranks: 25 batches, 12 per rank (all full); 8 images sit out each epoch
    raw = litdata.StreamingDataset(str(prepared[1] / "train"))
    every = {raw[i]["id"] for i in range(len(raw))}
    left_out = []
    for ranks in _epochs(prepared[1], batch_size=8, workers=2):
        assert [len(batches) for batches in ranks] == [12, 12]
        flat = [int(i) for batches in ranks for batch in batches for i in batch["ids"]]
        assert len(flat) == len(set(flat)) == 192
        left_out.append(every - set(flat))
    assert all(len(ids) == 8 for ids in left_out) and left_out[0] != left_out[1]


class _Record(pl.Callback):
    """Every training batch's (global step, ids, image checksum)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int], float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        checksum = float(batch["images"].double().mul(1.0001).sum())
        self.batches.append((trainer.global_step, batch["ids"].tolist(), checksum))


class _Linear(pl.LightningModule):
    """A linear model on the views: its weights depend on every batch, its order and its views."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 16 * 16, 4)

    def train_views(self) -> Any:
        return _crop

    def eval_views(self) -> Any:
        return lambda image: {"images": image[:, :16, :16]}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.net(batch["images"].float().flatten(1) / 255.0) - 1.0).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit(dst: Path, tmp: Path, workers: int, callbacks: list[pl.Callback], ckpt_path: str | None = None) -> _Linear:
    pl.seed_everything(11)
    module = _Linear()
    data = StreamingDataModule(str(dst), batch_size=8, num_workers=workers)  # 25 steps per epoch
    checkpoint = ModelCheckpoint(dirpath=tmp, every_n_train_steps=5, save_last=True)
    trainer = cpu_trainer(
        max_epochs=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint, *callbacks]
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize(
    ("workers", "crash", "saved"),
    [(0, 32, 30), (2, 32, 30), (2, 27, 25)],  # last.ckpt mid-epoch 1 (batch 5 of 25) or after epoch 0's last batch
)
def test_resume_matches_uninterrupted(
    workers: int, crash: int, saved: int, prepared: tuple[Path, Path, str], tmp_path: Path
) -> None:
    dst = prepared[1]
    reference_batches = _Record()
    reference = _fit(dst, tmp_path / "a", workers, [reference_batches])
    assert len(reference_batches.batches) == 50

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(dst, tmp_path / "b", workers, [CrashAt(at=crash)])
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert state["global_step"] == saved and state["StreamingDataModule"] == {"seed": 11}
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # litdata's epoch (from 1) and the samples this rank consumed of it, the saved step's batch included
    expected = ((saved - 1) // 25 + 1, ((saved - 1) % 25 + 1) * 8)
    assert (loader_state["current_epoch"], loader_state["num_samples_yielded"]) == expected

    resumed_batches = _Record()
    resumed = _fit(dst, tmp_path / "b", workers, [resumed_batches], ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    # the same batches (images, order and views) from the saved step on: nothing repeated, nothing skipped
    assert resumed_batches.batches == reference_batches.batches[saved:]
    torch.testing.assert_close(resumed.net.weight, reference.net.weight, atol=1e-6, rtol=0)


def test_method_trains_validates_and_monitors_knn(prepared: tuple[Path, Path, str]) -> None:
    pl.seed_everything(0)
    module, _ = tiny_method("conmim")  # 32-px images
    data = StreamingDataModule(str(prepared[1]), batch_size=8, num_workers=0)
    knn = OnlineKNN(k=5, batch_size=64)
    trainer = cpu_trainer(max_steps=3, limit_val_batches=2, val_check_interval=3, callbacks=[knn])
    trainer.fit(module, data)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    bank, queries = data.knn_datasets()  # type: ignore[misc]
    assert (len(bank), len(queries)) == (FOLDER_TRAIN, FOLDER_VAL)  # type: ignore[arg-type]
    assert [step for step, _ in knn.history] == [0, 3] and 0.0 <= knn.history[-1][1] <= 100.0


def test_cli_fits_a_quickstart_config_on_streamed_data(prepared: tuple[Path, Path, str], tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "lightning_mim",
        "fit",
        "--config",
        str(ROOT / "configs/quickstart/conmim.yaml"),
        "--data.class_path",
        "lightning_mim.data.StreamingDataModule",
        "--data.init_args.input_dir",
        str(prepared[1]),
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.num_workers",
        "0",
        "--trainer.max_steps",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in result.stdout + result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_a_stop_at_an_epoch_boundary(
    workers: int, prepared: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """As for the other data modules (tests/test_resume.py): all of epoch 1 after a stop at epoch 0's end."""
    from .helpers import assert_epoch_boundary_resume_is_exact

    def data() -> StreamingDataModule:
        return StreamingDataModule(str(prepared[1]), batch_size=64, num_workers=workers)  # 200 images: 3 steps

    assert_epoch_boundary_resume_is_exact(data, tmp_path)
