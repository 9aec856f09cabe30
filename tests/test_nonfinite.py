"""NonFiniteGuard: a NaN / inf loss stops the run naming the step and term, or the step is skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mim.methods.cmae as cmae_module
from lightning_mim.callbacks import NonFiniteGuard, NonFiniteLossError
from lightning_mim.checkpoint.io import AtomicCheckpointIO
from lightning_mim.data import SampleDataModule
from tests.helpers import cpu_trainer, tiny_method


class _TwoTerms(pl.LightningModule):
    """loss = a + b on random batches; term ``b`` is NaN at the steps in ``nan_at``."""

    def __init__(self, nan_at: set[int]) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_at = nan_at
        self.weights_seen: list[torch.Tensor] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.weights_seen.append(self.net.weight.detach().clone())
        a = self.net(x).pow(2).mean()
        b = self.net(x).abs().mean()
        if self.global_step in self.nan_at:
            b = b * float("nan")
        self.log("train/loss_a", a)
        self.log("train/loss_b", b)
        return a + b

    def train_dataloader(self) -> Any:
        return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _trainer(tmp: Path, guard: NonFiniteGuard, steps: int = 10) -> pl.Trainer:
    checkpoint = ModelCheckpoint(dirpath=tmp, every_n_train_steps=2, save_last=True, save_top_k=0)
    return cpu_trainer(
        max_steps=steps, enable_checkpointing=True, plugins=[AtomicCheckpointIO()], callbacks=[checkpoint, guard]
    )


def test_raise_names_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    module = _TwoTerms(nan_at={5})
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*train/loss_b \(first at step 5\)") as info:
        _trainer(tmp_path, NonFiniteGuard(check_every_n_steps=4)).fit(module)
    assert "train/loss_a" not in str(info.value)  # only the term that went non-finite is named
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the checkpoint of step 6 (non-finite weights) was refused
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not torch.isfinite(module.net.weight).all()  # the weights in memory did go bad


def test_raise_checks_only_every_n_steps(tmp_path: Path) -> None:
    module = _TwoTerms(nan_at={1})
    guard = NonFiniteGuard(check_every_n_steps=100)
    trainer = cpu_trainer(max_steps=6, callbacks=[guard])  # no checkpoints: found at the end of training
    with pytest.raises(NonFiniteLossError, match="at the end of training"):
        trainer.fit(module)
    assert trainer.global_step == 6


def test_skip_leaves_the_weights_of_a_bad_step_unchanged(tmp_path: Path) -> None:
    module = _TwoTerms(nan_at={3})
    guard = NonFiniteGuard(mode="skip")
    with pytest.warns(UserWarning, match=r"non-finite loss at step 3 .*loss_b.*1 so far"):
        trainer = _trainer(tmp_path, guard, steps=8)
        trainer.fit(module)
    assert guard.skipped_steps == 1 and trainer.global_step == 8
    seen = module.weights_seen
    assert torch.equal(seen[4], seen[3])  # step 3 (NaN) changed nothing, not even by weight decay
    assert not torch.equal(seen[3], seen[2]) and not torch.equal(seen[5], seen[4])
    assert torch.isfinite(module.net.weight).all()
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]


def test_skip_gives_up_after_max_skipped(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="more than max_skipped=2"), pytest.warns(UserWarning):
        cpu_trainer(max_steps=10, callbacks=[NonFiniteGuard(mode="skip", max_skipped=2)]).fit(
            _TwoTerms(nan_at={1, 2, 3, 4})
        )


def test_a_real_method_names_its_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CMAE's reconstruction term turns infinite at step 2: the error names train/loss_rec, not loss_con."""
    real = cmae_module.masked_patch_mse
    calls = {"n": 0}

    def exploding(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("inf") if calls["n"] == 3 else value  # the third training step

    monkeypatch.setattr(cmae_module, "masked_patch_mse", exploding)
    pl.seed_everything(0)
    module, _ = tiny_method("cmae")
    data = SampleDataModule(batch_size=8, num_workers=0, train_size=48, val_size=8)
    trainer = cpu_trainer(max_steps=5, limit_val_batches=0, callbacks=[NonFiniteGuard(check_every_n_steps=1)])
    with pytest.raises(NonFiniteLossError, match=r"step 2: .*train/loss_rec") as info:
        trainer.fit(module, data)
    assert "train/loss_con" not in str(info.value)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        NonFiniteGuard(mode="ignore")
    with pytest.raises(ValueError, match="check_every_n_steps"):
        NonFiniteGuard(check_every_n_steps=0)
