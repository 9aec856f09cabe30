"""VisualDiagnostics: every method draws its panels, files are written, training is left unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torchvision.io import read_image

from lightning_mim.callbacks import VisualDiagnostics
from lightning_mim.data import SampleDataModule

from .helpers import TINY_VIT_8X8, PretrainingModule, cpu_trainer, flat, tiny_cim, tiny_cmae, tiny_conmim, tiny_mimco

PANELS = {"conmim": 3, "cmae": 3, "mimco": 3, "cim_respix": 5, "cim_revdet": 5}
# Each method's tiny module, with the narrow heads (and, for MimCo, the 8x8 grid) of these tests.
MODULES: dict[str, Callable[[], PretrainingModule]] = {
    "conmim": lambda: tiny_conmim(proj_hidden_dim=32, proj_dim=16),
    "cmae": lambda: tiny_cmae(decoder_dim=16, proj_hidden_dim=1536, proj_dim=256),  # CMAE's default projector
    "mimco": lambda: tiny_mimco(backbone_kwargs=TINY_VIT_8X8, proj_hidden_dim=32),
    "cim_respix": lambda: tiny_cim(objective="respix"),
    "cim_revdet": lambda: tiny_cim(objective="revdet"),
}


def fit(module: pl.LightningModule, tmp_path: Path, callbacks: list) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0, logger=CSVLogger(tmp_path, name="csv"), callbacks=callbacks)
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8))
    return trainer


@pytest.mark.parametrize("method", sorted(PANELS))
def test_diagnostics_write_grids_and_leave_training_unchanged(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = MODULES[method]()
    fit(reference, tmp_path / "plain", [])
    torch.manual_seed(0)  # the same initial weights
    module = MODULES[method]()
    callback = VisualDiagnostics(every_n_steps=2, num_images=4)
    trainer = fit(module, tmp_path / "diag", [callback])
    assert [p.name for p in callback.written] == ["step_0000000.png", "step_0000002.png"]
    assert isinstance(trainer.logger, CSVLogger)
    assert all(p.parent == Path(trainer.logger.log_dir) / "diagnostics" for p in callback.written)
    grid = read_image(str(callback.written[-1]))
    # 4 rows of PANELS[method] 32-px panels with 1-px padding
    assert tuple(grid.shape) == (3, 4 * 33 + 1, PANELS[method] * 33 + 1)
    assert grid.float().std() > 5  # not blank
    # same weights as without the callback: no training random stream or statistics was touched
    assert torch.equal(flat(module), flat(reference))
    assert all(b1.equal(b2) for b1, b2 in zip(module.buffers(), reference.buffers(), strict=True))


def test_modes_are_restored(tmp_path: Path) -> None:
    module = tiny_cim(objective="revdet")
    fit(module, tmp_path, [VisualDiagnostics(every_n_steps=1, num_images=2)])
    assert module.generator.training and module.enhancer.training and not module.tokenizer.training


def test_module_without_diagnostics_gets_a_clear_error(tmp_path: Path) -> None:
    from lightning_mim import VQTokenizerModule

    module = VQTokenizerModule(vocab_size=16, code_dim=4, hidden_dim=8, num_res_blocks=1, downsample=4, image_size=32)
    with pytest.raises(TypeError, match="no diagnostics"):
        fit(module, tmp_path, [VisualDiagnostics(every_n_steps=1)])
