"""The public extension surface: subclass a method, swap a head through its build_* hook, train, resume."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mim import CMAEModule, ConMIMModule, MimCoModule, MoCoV3Module
from lightning_mim.data import SampleDataModule
from lightning_mim.methods._parts import LossTerms
from lightning_mim.optim import OptimConfig

from .helpers import TINY_VIT_4X4, cpu_trainer, tiny_cmae, tiny_conmim, tiny_mimco, tiny_mocov3

ROOT = Path(__file__).resolve().parents[1]
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0)


class LinearConMIM(ConMIMModule):
    def build_projector(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, self.proj_dim)


class LinearCMAE(CMAEModule):
    def build_projector(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, self.proj_dim)


class LinearMoCo(MoCoV3Module):
    def build_projector(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, self.proj_dim)


class LinearMimCo(MimCoModule):
    def build_image_head(self, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Linear(in_dim, out_dim)


# (class, kwargs, the swapped head of the trained network, its EMA copy or None)
CASES: dict[str, tuple[type[pl.LightningModule], dict[str, Any], Callable[[Any], nn.Module], Any]] = {
    "conmim": (
        LinearConMIM,
        {"backbone_kwargs": TINY_VIT_4X4, "proj_hidden_dim": 32, "proj_dim": 16, "momentum": 0.5},
        lambda m: m.student.projector,
        lambda m: m.teacher.projector,
    ),
    "cmae": (
        LinearCMAE,
        {
            "backbone": "vit_small_patch16_224",
            "backbone_kwargs": TINY_VIT_4X4,
            "decoder_dim": 16,
            "decoder_depth": 1,
            "decoder_heads": 2,
            "proj_hidden_dim": 32,
            "proj_dim": 16,
            "momentum": 0.5,
        },
        lambda m: m.online_heads.projector,
        lambda m: m.target_projector,
    ),
    "mocov3": (
        LinearMoCo,
        {"backbone_kwargs": TINY_VIT_4X4, "proj_hidden_dim": 32, "proj_dim": 16, "momentum": 0.5},
        lambda m: m.base.projector,
        lambda m: m.momentum_branch.projector,
    ),
    "mimco": (
        LinearMimCo,
        {"backbone_kwargs": TINY_VIT_4X4, "allow_random_teacher": True, "patch_hidden_dim": 32, "proj_hidden_dim": 32},
        lambda m: m.image_head,
        None,
    ),
}


@pytest.mark.parametrize("method", list(CASES))
def test_a_subclass_swaps_a_head_for_student_and_teacher_and_round_trips(method: str, tmp_path: Path) -> None:
    cls, kwargs, head_of, copy_of = CASES[method]
    torch.manual_seed(0)
    module = cls(optim=OPTIM, **kwargs)
    head = head_of(module)
    assert type(head) is nn.Linear
    before = {k: v.clone() for k, v in head.state_dict().items()}
    if copy_of is not None:
        copy = copy_of(module)
        assert type(copy) is nn.Linear and not any(p.requires_grad for p in copy.parameters())
        assert all(torch.equal(copy.state_dict()[k], v) for k, v in before.items())  # copied after the hook ran
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4))
    after = head.state_dict()
    assert not torch.equal(after["weight"], before["weight"])  # the new head trains
    if copy_of is not None:
        # one EMA step with momentum 0.5 (cosine schedules start there): teacher = (before + after) / 2
        ema = copy_of(module).state_dict()
        for key in before:
            assert torch.allclose(ema[key], 0.5 * before[key] + 0.5 * after[key], atol=1e-6), key
    ckpt = tmp_path / "subclass.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = cls.load_from_checkpoint(ckpt, weights_only=True)
    assert type(head_of(restored)) is nn.Linear
    state, expected = restored.state_dict(), module.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_compute_losses_is_the_algorithm_and_its_total_the_weighted_sum() -> None:
    torch.manual_seed(0)
    module = tiny_cmae(
        backbone_kwargs=TINY_VIT_4X4,
        decoder_dim=16,
        proj_hidden_dim=1536,  # CMAE's default projector
        proj_dim=256,
        reconstruction_weight=0.5,
        contrastive_weight=3.0,
    )
    images = torch.randn(4, 3, 32, 32)
    mask = module.masking(4, generator=torch.Generator().manual_seed(0))
    result = module.compute_losses(images, images.flip(-1), mask)
    assert isinstance(result, LossTerms) and list(result.terms) == ["loss_rec", "loss_con"]
    rec, con = result.terms["loss_rec"], result.terms["loss_con"]
    assert torch.equal(result.total, 0.5 * rec + 3.0 * con)
    with pytest.raises(ValueError, match="no terms"):
        _ = LossTerms({}).total


def test_encoder_is_the_same_method_everywhere() -> None:
    conmim = tiny_conmim(proj_hidden_dim=32, proj_dim=16)
    assert conmim.encoder() is conmim.student.encoder.vit and conmim.encoder("teacher") is conmim.teacher.encoder.vit
    moco = tiny_mocov3(proj_hidden_dim=32)
    assert moco.encoder() is moco.base.encoder and moco.encoder("teacher") is moco.momentum_branch.encoder
    mimco = tiny_mimco(proj_hidden_dim=32)
    assert mimco.encoder() is mimco.student.vit
    for module in (conmim, moco, mimco):
        with pytest.raises(ValueError, match=r"encoder\(which='nope'\)"):
            module.encoder("nope")  # type: ignore[arg-type]


def test_change_one_part_example(tmp_path: Path) -> None:
    script = ROOT / "examples" / "change_one_part.py"
    result = subprocess.run(
        [sys.executable, str(script), "--max-steps", "5"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["student projector"].startswith("Linear(in_features=192, out_features=128")
    assert lines["teacher projector"] == lines["student projector"]
    # cosine from 0.2 to 0.1 over 5 steps, last set at step 4
    expected = 0.1 + 0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 5))
    start, end = lines["temperature"].split(" -> ")
    assert float(start) == 0.2 and float(end) == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(float(lines["train/loss"]))
