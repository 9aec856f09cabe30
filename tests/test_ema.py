"""EMATeacher on a module that is not lightning-mim's: updates, accumulation, resume, errors."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mim.callbacks import EMATeacher
from lightning_mim.callbacks.ema import cosine_momentum


class StudentAndTeacher(nn.Module):
    """A student ``encoder`` and its EMA copy ``target``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.target = copy.deepcopy(encoder).requires_grad_(False)


class ForeignModule(pl.LightningModule):
    """A plain regression module with its student and teacher nested under ``model``."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.model = StudentAndTeacher(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
        with torch.no_grad():  # start the teacher away from the student
            for p in self.model.target.parameters():
                p.add_(1.0)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model.encoder(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.encoder.parameters(), lr=self.lr)


def loader(n: int = 8, batch_size: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)), batch_size=batch_size
    )


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.9, 1.0) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)


def test_updates_once_per_optimizer_step_under_accumulation() -> None:
    # lr = 0 keeps the student fixed, so after k updates: t = s + prod(m_i) * (t0 - s).
    module = ForeignModule(lr=0.0)
    student, teacher0 = flat(module.model.encoder), flat(module.model.target)
    ema = EMATeacher("model.encoder", "model.target", momentum=0.9, final_momentum=1.0)
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[ema]).fit(module, loader(8, 2))  # 4 batches, 2 steps
    assert ema._latest_update_step == 2
    total = 2  # estimated_stepping_batches
    factor = cosine_momentum(0, total, 0.9, 1.0) * cosine_momentum(1, total, 0.9, 1.0)
    expected = student + factor * (teacher0 - student)
    assert torch.allclose(flat(module.model.target), expected, atol=1e-6)


def test_matches_manual_ema_while_student_trains() -> None:
    module = ForeignModule(lr=0.1)
    expected_teacher = flat(module.model.target).clone()
    ema = EMATeacher("model.encoder", "model.target", momentum=0.8, final_momentum=0.8)

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            nonlocal expected_teacher
            expected_teacher = 0.8 * expected_teacher + 0.2 * flat(pl_module.model.encoder)

    # Recorder runs after EMATeacher (callback order), both after the optimizer step.
    trainer(max_epochs=1, callbacks=[ema, Recorder()]).fit(module, loader(8, 2))
    assert torch.allclose(flat(module.model.target), expected_teacher, atol=1e-6)
    assert not torch.allclose(flat(module.model.target), flat(module.model.encoder))


def test_logs_momentum() -> None:
    module = ForeignModule()
    t = trainer(max_epochs=1, callbacks=[EMATeacher("model.encoder", "model.target", momentum=0.5, final_momentum=0.5)])
    t.fit(module, loader())
    assert t.callback_metrics["train/ema_momentum"].item() == pytest.approx(0.5)


def test_momentum_pairs_protocol() -> None:
    class Paired(ForeignModule):
        def momentum_pairs(self):
            return [(self.model.encoder, self.model.target)]

    module = Paired(lr=0.0)
    trainer(max_steps=1, callbacks=[EMATeacher(momentum=0.0, final_momentum=0.0)]).fit(module, loader())
    assert torch.equal(flat(module.model.target), flat(module.model.encoder))  # m = 0 copies the student


def test_resume_mid_run_matches_uninterrupted(tmp_path) -> None:
    class Interrupt(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def run(ckpt_path: str | None = None, interrupt: bool = False) -> ForeignModule:
        pl.seed_everything(0)
        module = ForeignModule()
        callbacks: list[pl.Callback] = [EMATeacher("model.encoder", "model.target", momentum=0.7)]
        if interrupt:
            callbacks += [Interrupt(), ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1)]
        t = trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=interrupt)
        t.fit(module, loader(8, 2), ckpt_path=ckpt_path)
        return module

    full = run()
    run(interrupt=True)  # stops after the first of two epochs (4 of 8 steps)
    ckpt = next(tmp_path.glob("*step=4*.ckpt"))
    resumed = run(ckpt_path=str(ckpt))
    assert torch.allclose(flat(resumed.model.target), flat(full.model.target), atol=1e-7)
    assert torch.allclose(flat(resumed.model.encoder), flat(full.model.encoder), atol=1e-7)
    # and it is not trivially equal to a run that never updated the teacher
    assert not torch.allclose(flat(full.model.target), flat(ForeignModule().model.target))


def test_clear_errors() -> None:
    with pytest.raises(AttributeError, match=r"no attribute path 'model\.nothing'"):
        trainer(max_steps=1, callbacks=[EMATeacher("model.encoder", "model.nothing")]).fit(ForeignModule(), loader())
    module = ForeignModule()
    module.model.target.requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"):
        trainer(max_steps=1, callbacks=[EMATeacher("model.encoder", "model.target")]).fit(module, loader())
    with pytest.raises(ValueError, match="momenta"):
        EMATeacher(momentum=1.5)
