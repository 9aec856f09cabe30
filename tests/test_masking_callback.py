"""MaskingCallback on a user's own module: masks attached on device, seeded, resumable."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mim.callbacks import MaskingCallback
from lightning_mim.masking import RandomMasking

from .helpers import CrashAt, cpu_trainer


class Images(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"images": torch.full((3, 8, 8), float(index))}


class UsesMasks(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3 * 8 * 8, 1)
        self.masks: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.masks.append(batch["mask"].clone())
        assert batch["mask"].device == batch["images"].device
        return self.layer(batch["images"].flatten(1)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callback: MaskingCallback) -> UsesMasks:
    pl.seed_everything(0)
    module = UsesMasks()
    cpu_trainer(max_epochs=1, callbacks=[callback]).fit(module, DataLoader(Images(), batch_size=4))
    return module


def test_masks_attached_with_exact_counts_and_seeded() -> None:
    a = fit(MaskingCallback(RandomMasking(4, 0.5)))
    b = fit(MaskingCallback(RandomMasking(4, 0.5)))
    assert len(a.masks) == 2 and a.masks[0].shape == (4, 16) and a.masks[0].dtype == torch.bool
    assert all((m.sum(1) == 8).all() for m in a.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))  # same seed, same masks
    assert not torch.equal(a.masks[0], a.masks[1])  # the stream advances


def test_generator_state_round_trips() -> None:
    callback = MaskingCallback(RandomMasking(4, 0.5))
    fit(callback)
    state = callback.state_dict()
    restored = MaskingCallback(RandomMasking(4, 0.5))
    restored.load_state_dict(state)
    restored.setup(cpu_trainer(), UsesMasks(), "fit")
    batch_a, batch_b = {"x": torch.zeros(2, 1)}, {"x": torch.zeros(2, 1)}
    callback._attach(batch_a)
    restored._attach(batch_b)
    assert torch.equal(batch_a["mask"], batch_b["mask"])


class TrainsOnMasks(pl.LightningModule):
    """A user module whose weights depend on every training mask; validation uses masks too."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 1)
        self.val_masks: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch["mask"].float()).pow(2).mean() + 0 * batch["images"].sum()

    def validation_step(self, batch, batch_idx):
        self.val_masks.append(batch["mask"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_with_validation(tmp: Path, callbacks: list[pl.Callback], ckpt_path: str | None = None) -> TrainsOnMasks:
    pl.seed_everything(0)
    module = TrainsOnMasks()
    # last.ckpt every 4 steps, at the end of each epoch's training batches: just before its validation
    checkpoint = ModelCheckpoint(dirpath=tmp, every_n_train_steps=4, save_last=True)
    trainer = cpu_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[checkpoint, *callbacks])
    loader = DataLoader(Images(), batch_size=2)
    trainer.fit(module, loader, DataLoader(Images(), batch_size=4), ckpt_path=ckpt_path)
    return module


def test_resume_before_a_validation_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    reference = fit_with_validation(tmp_path / "a", [MaskingCallback(RandomMasking(4, 0.5))])
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_with_validation(tmp_path / "b", [MaskingCallback(RandomMasking(4, 0.5)), CrashAt(at=5)])
    # last.ckpt holds step 4, written before epoch 0's validation, which the resumed run does not repeat
    resumed = fit_with_validation(
        tmp_path / "b", [MaskingCallback(RandomMasking(4, 0.5))], ckpt_path=str(tmp_path / "b" / "last.ckpt")
    )
    assert torch.equal(resumed.layer.weight, reference.layer.weight)
    assert torch.equal(resumed.layer.bias, reference.layer.bias)
    # validation masks depend on the batch index only: the same at every evaluation
    assert len(reference.val_masks) == 6 and torch.equal(reference.val_masks[0], reference.val_masks[2])
    assert not torch.equal(reference.val_masks[0], reference.val_masks[1])
