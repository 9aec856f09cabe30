"""Exact resume: an interrupted and resumed run ends where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchvision.transforms import v2

from lightning_mim._rng import seed_torch
from lightning_mim.data import ResumableSampler, SampleDataModule
from lightning_mim.data.folder import TensorImageDataset
from lightning_mim.data.sampling import apply_seeded
from tests.helpers import TINY_METHODS, CrashAt, cpu_trainer, tiny_method


class _Record(pl.Callback):
    """The (global step, batch checksum) of every training batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.batches.append((trainer.global_step, float(batch["images"].double().mul(1.0001).sum())))


class _Tiny(pl.LightningModule):
    """A linear model on random crops: its weights depend on every batch, its order and its views."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 24 * 24, 4)

    def train_views(self) -> Any:
        crop = v2.Compose([v2.RandomResizedCrop(24, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip()])
        return lambda image: {"images": crop(image)}

    def eval_views(self) -> Any:
        return lambda image: {"images": image[:, :24, :24]}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["images"].float().flatten(1) / 255.0
        return (self.net(x) - 1.0).pow(2).mean()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)}


def _fit(
    tmp: Path, workers: int, callbacks: list[pl.Callback], ckpt_path: str | None = None, every: int | None = 5
) -> _Tiny:
    pl.seed_everything(7)
    module = _Tiny()
    data = SampleDataModule(batch_size=8, num_workers=workers, train_size=96, val_size=8)
    checkpoint = ModelCheckpoint(
        dirpath=tmp, every_n_train_steps=every, save_last=True, save_on_train_epoch_end=every is None
    )
    trainer = cpu_trainer(
        max_epochs=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint, *callbacks]
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_matches_uninterrupted(workers: int, tmp_path: Path) -> None:
    reference_batches = _Record()
    reference = _fit(tmp_path / "a", workers, [reference_batches])

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", workers, [CrashAt(at=17)])  # last.ckpt at step 15: epoch 1, batch 3 of 12
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 15 and state["SampleDataModule"]["batches_done"] == 3

    resumed_batches = _Record()
    resumed = _fit(tmp_path / "b", workers, [resumed_batches], ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    # the same batches (order and views) from step 15 on: nothing repeated, nothing skipped
    assert resumed_batches.batches == reference_batches.batches[15:]
    torch.testing.assert_close(resumed.net.weight, reference.net.weight, atol=1e-6, rtol=0)


def test_resume_at_epoch_boundary_matches_uninterrupted(tmp_path: Path) -> None:
    reference = _fit(tmp_path / "a", 0, [], every=None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", 0, [CrashAt(at=14)], every=None)  # last.ckpt: the end of epoch 0, step 12
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 12 and state["epoch"] == 0
    resumed = _fit(tmp_path / "b", 0, [], ckpt_path=str(tmp_path / "b" / "last.ckpt"), every=None)
    torch.testing.assert_close(resumed.net.weight, reference.net.weight, atol=1e-6, rtol=0)


def test_sampler_shards_and_resumes() -> None:
    data = TensorImageDataset(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10), lambda x: {"images": x})
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in range(2):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        keys = [list(s) for s in ranks]
        indices = sorted(k[0] for rank_keys in keys for k in rank_keys)
        assert indices == list(range(10))  # every sample once per epoch across the ranks
    first = list(ranks[0])
    ranks[0].resume(1, 2)
    assert list(ranks[0]) == first[2:]  # the rest of the epoch, once
    assert list(ranks[0]) == first  # then whole epochs again
    ranks[0].set_epoch(2)
    assert [k[0] for k in ranks[0]] != [k[0] for k in first]
    # view seeds depend on (seed, epoch, index) only
    other = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
    other.set_epoch(2)
    seeds = {k[0]: k[1] for k in other}
    assert all(seeds[i] == s for i, s in ranks[0])
    with pytest.raises(ValueError, match="samples_done"):
        ranks[0].resume(0, 6)


def test_seeded_keys_fix_the_views_without_touching_the_global_rng() -> None:
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crop = v2.RandomResizedCrop(8, antialias=True)
    data = TensorImageDataset(images, torch.zeros(4, dtype=torch.long), lambda x: {"images": crop(x)})
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = data[(2, 12345)]["images"]
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.rand(5)  # the global stream moves on: the keyed view does not
    assert torch.equal(data[(2, 12345)]["images"], a)
    assert not torch.equal(data[(2, 12346)]["images"], a)
    torch.manual_seed(12345)  # the keyed view is the transform under that seed
    assert torch.equal(crop(images[2]), a)


def test_seeded_transform_restores_the_generator_when_it_fails() -> None:
    def failing(image: torch.Tensor) -> torch.Tensor:
        torch.rand(3)
        raise OSError("broken image")

    before = torch.random.get_rng_state()
    with pytest.raises(OSError, match="broken image"):
        apply_seeded(failing, None, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_seed_torch_matches_manual_seed_on_the_cpu() -> None:
    seed_torch(2024)
    a = torch.rand(4)
    torch.manual_seed(2024)
    assert torch.equal(torch.rand(4), a) and torch.initial_seed() == 2024


METHODS = ["conmim", "cmae", "mimco", "cim", "mocov3", "vq_tokenizer"]


def _fit_method(
    method: str, tmp: Path, callbacks: list[pl.Callback], ckpt_path: str | None = None, every: int | None = None
) -> tuple[pl.LightningModule, pl.Trainer]:
    pl.seed_everything(3)
    module, _ = tiny_method(method, drop_path=0.1)  # drop path: the global random stream matters
    data = SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8)  # 4 steps per epoch
    checkpoint = ModelCheckpoint(
        dirpath=tmp, every_n_train_steps=every, save_last=True, save_on_train_epoch_end=every is None
    )
    trainer = cpu_trainer(
        max_epochs=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint, *callbacks]
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def _assert_same_state(a: tuple[pl.LightningModule, pl.Trainer], b: tuple[pl.LightningModule, pl.Trainer]) -> None:
    """Every parameter and buffer (students, teachers, BatchNorm statistics, codebooks) and the optimizer state."""
    state_a, state_b = a[0].state_dict(), b[0].state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=1e-6, rtol=0, msg=key)
    optim_a, optim_b = a[1].optimizers[0].state_dict(), b[1].optimizers[0].state_dict()
    torch.testing.assert_close(optim_b["state"], optim_a["state"], atol=1e-6, rtol=0)
    assert [g["lr"] for g in optim_a["param_groups"]] == pytest.approx([g["lr"] for g in optim_b["param_groups"]])


@pytest.mark.parametrize("method", METHODS)
def test_method_resumes_exactly_from_an_epoch_boundary(method: str, tmp_path: Path) -> None:
    reference = _fit_method(method, tmp_path / "a", [])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_method(method, tmp_path / "b", [CrashAt(at=6)])  # last.ckpt: end of epoch 0 (step 4)
    last = tmp_path / "b" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed = _fit_method(method, tmp_path / "b", [], ckpt_path=str(last))
    assert resumed[1].global_step == reference[1].global_step == 8
    _assert_same_state(reference, resumed)


def test_tiny_method_names_the_methods_it_knows() -> None:
    assert sorted(METHODS) == sorted(TINY_METHODS)  # every method is resumed above
    with pytest.raises(ValueError, match=r"unknown method 'moco'; expected one of conmim, mimco, mocov3, vq_tokenizer"):
        tiny_method("moco")


def test_method_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    reference = _fit_method("conmim", tmp_path / "a", [], every=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_method("conmim", tmp_path / "b", [CrashAt(at=5)], every=3)  # last.ckpt: step 3, batch 3 of 4
    last = tmp_path / "b" / "last.ckpt"
    assert torch.load(last, weights_only=True)["SampleDataModule"]["batches_done"] == 3
    _assert_same_state(reference, _fit_method("conmim", tmp_path / "b", [], ckpt_path=str(last), every=3))


def test_derived_seeds_are_decorrelated() -> None:
    """Seeds made from a counter (one per step, per image) must not give related random draws.

    With plain ``seed + step`` the VQ tokenizer's per-step codebook restarts drew related picks and its
    codebook collapsed; ``mix_seed`` spreads every input bit over the seed's low 32 bits, which are all
    torch's CPU generator uses.
    """
    from lightning_mim._rng import CountedStream, mix_seed

    seeds = [mix_seed(12345, step) for step in range(4096)]
    low = torch.tensor([s & 0xFFFFFFFF for s in seeds], dtype=torch.float64)
    assert len({s & 0xFFFFFFFF for s in seeds}) == 4096
    centred = low - low.mean()
    lag1 = float((centred[1:] * centred[:-1]).mean() / centred.var())
    assert abs(lag1) < 0.05
    assert mix_seed(1, 2) != mix_seed(2, 1)
    stream = CountedStream(7)
    stream.base = 3
    picks = [torch.randint(0, 2048, (64,), generator=stream.next(0)) for _ in range(200)]
    same = sum(int((a == b).sum()) for a, b in zip(picks[1:], picks[:-1], strict=True))
    assert same < 0.01 * 64 * 199 + 20  # consecutive draws agree only by chance (1/2048 per pick)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("source", ["sample", "folder"])
def test_resume_after_a_stop_at_an_epoch_boundary(source: str, workers: int, tmp_path: Path) -> None:
    """A step-limited run stopped by ``should_stop`` at the end of epoch 0 resumes with all of epoch 1
    (it ran only epoch 1's last batch: Lightning carried the finished epoch's batch count over)."""
    from lightning_mim.data import ImageNetDataModule

    from .helpers import assert_epoch_boundary_resume_is_exact, write_sample_folder

    def data() -> pl.LightningDataModule:
        if source == "sample":
            return SampleDataModule(batch_size=16, num_workers=workers, train_size=48, val_size=16)  # 3 steps
        return ImageNetDataModule(tmp_path / "images", batch_size=64, num_workers=workers)  # 200 images: 3 steps

    if source == "folder":
        write_sample_folder(tmp_path / "images")
    assert_epoch_boundary_resume_is_exact(data, tmp_path)
