"""MaskingCallback on a user's own module: masks attached on device, seeded, resumable."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mim.callbacks import MaskingCallback
from lightning_mim.masking import RandomMasking

from .helpers import cpu_trainer


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
