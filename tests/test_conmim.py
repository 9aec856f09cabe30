"""ConMIMModule on a tiny BEiT: faithful structure, learning, teacher behaviour, checkpoints."""

from __future__ import annotations

import dataclasses
from typing import cast

import pytest
import torch
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from torch import nn

from lightning_mim import ConMIMModule
from lightning_mim.data import SampleDataModule
from lightning_mim.masking import BlockMasking, GridMasking
from lightning_mim.methods.conmim import CONMIM_OPTIM

from .helpers import cpu_trainer, flat, losses_on_fixed_batch, tiny_conmim

QUICK = dataclasses.replace(CONMIM_OPTIM, lr=1e-3, warmup_steps=0)  # ConMIM's optimizer without warm-up


def batch(size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g)
    return {"images": images, "teacher_images": (images.float() * 0.8).to(torch.uint8)}


def test_default_backbone_is_the_official_beit() -> None:
    module = ConMIMModule(proj_hidden_dim=64)  # ViT-B/16 at 224, BEiT-style
    vit = module.student.encoder.vit
    assert isinstance(vit, Beit)
    assert vit.pos_embed is None and vit.rel_pos_bias is not None  # shared relative position bias only
    blocks = [cast(BeitBlock, block) for block in vit.blocks]
    assert all(block.attn.relative_position_bias_table is None for block in blocks)
    assert torch.allclose(blocks[0].gamma_1, torch.full((768,), 0.1))  # layer scale 0.1
    assert torch.count_nonzero(vit.rel_pos_bias.relative_position_bias_table) == 0  # zero-initialised
    assert (vit.embed_dim, len(blocks), blocks[0].attn.num_heads) == (768, 12, 12)
    assert isinstance(vit.norm, nn.LayerNorm) and isinstance(vit.fc_norm, nn.Identity)  # norm on every token
    assert vit.norm.eps == 1e-6
    masking = module.masking
    assert isinstance(masking, BlockMasking)
    assert (masking.num_masking_patches, masking.min_num_patches, masking.height) == (75, 16, 14)


def test_projector_structure() -> None:
    module = tiny_conmim(proj_hidden_dim=64, proj_dim=32, optim=QUICK)
    layers = list(cast(nn.Sequential, module.student.projector))
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(layer.bias is None for layer in layers if isinstance(layer, nn.Linear))
    assert not layers[-1].affine  # the last BatchNorm has no scale/shift


def test_loss_finite_and_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    module = tiny_conmim(optim=QUICK)
    data = batch(16)
    losses = losses_on_fixed_batch(module, data, steps=25, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses


def test_teacher_gets_no_gradients() -> None:
    module = tiny_conmim(optim=QUICK)
    module.training_step(batch(), 0).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_teacher_moves_only_by_ema() -> None:
    dm = SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8)
    # momentum 1: the teacher never moves, though the student trains
    module = tiny_conmim(momentum=1.0, final_momentum=1.0, optim=QUICK)
    teacher0, student0 = flat(module.teacher).clone(), flat(module.student).clone()
    cpu_trainer(max_steps=3, limit_val_batches=0).fit(module, dm)
    assert torch.equal(flat(module.teacher), teacher0)
    assert not torch.allclose(flat(module.student), student0)
    # momentum 0: the teacher equals the student after every step
    module = tiny_conmim(momentum=0.0, final_momentum=0.0, optim=QUICK)
    cpu_trainer(max_steps=3, limit_val_batches=0).fit(module, dm)
    assert torch.equal(flat(module.teacher), flat(module.student))


def test_optimizer_covers_the_student_only_with_the_official_decay_rule() -> None:
    module = tiny_conmim(optim=QUICK)
    dm = SampleDataModule(batch_size=8, num_workers=0, train_size=16, val_size=8)
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, dm)
    optimizer = trainer.optimizers[0]
    ids = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(ids) == {id(p) for p in module.student.parameters()}
    named = dict(module.student.named_parameters())
    # The official rule: 1-D, biases, pos_embed and cls_token only; the mask token and the shared
    # relative-position-bias table ARE decayed (timm's no_weight_decay() would exempt both).
    assert ids[id(named["encoder.mask_token"])] == 0.05
    assert ids[id(named["encoder.vit.cls_token"])] == 0.0
    assert ids[id(named["encoder.vit.rel_pos_bias.relative_position_bias_table"])] == 0.05
    assert ids[id(named["encoder.vit.blocks.0.attn.qkv.weight"])] == 0.05
    assert ids[id(named["projector.0.weight"])] == 0.05
    assert optimizer.defaults["betas"] == (0.9, 0.98)  # ConMIM's default, kept when only lr is overridden


def test_masking_must_match_the_grid() -> None:
    with pytest.raises(ValueError, match="does not match"):
        tiny_conmim(masking=GridMasking(14, 2, 0.75), optim=QUICK)
    module = tiny_conmim(masking=GridMasking(4, 2, 0.5), optim=QUICK)  # any generator on the right grid works
    assert module.training_step(batch(), 0).isfinite()


def test_embed_and_encoders() -> None:
    module = tiny_conmim(optim=QUICK)
    assert module.eval_encoder == "teacher" and module.default_export == "teacher"  # watched = exported
    features = module.embed(batch()["images"])
    assert features.shape == (8, 48)
    assert module.encoder("teacher") is module.teacher.encoder.vit
    student = tiny_conmim(eval_encoder="student", optim=QUICK)
    assert student.default_export == "student"
    # the monitored features are the student's own: perturb the teacher and nothing changes
    with torch.no_grad():
        before = student.embed(batch()["images"])
        for p in student.teacher.parameters():
            p.add_(1.0)
        assert torch.equal(student.embed(batch()["images"]), before)


def test_checkpoint_of_another_kind_is_refused() -> None:
    module = tiny_conmim(optim=QUICK)
    with pytest.raises(ValueError, match="not a ConMIM checkpoint"):
        module.on_load_checkpoint({"state_dict": {}})
    with pytest.raises(ValueError, match="found: cmae"):
        module.on_load_checkpoint({"lightning_mim": {"method": "cmae"}})


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        tiny_conmim(temperature=0.0, optim=QUICK)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        tiny_conmim(backbone="no_such_vit", optim=QUICK)


def test_crop_scale_reaches_the_shared_crop() -> None:
    def crop_scale(module: ConMIMModule) -> tuple[float, float]:
        (crop,) = [t for t in module.train_views().geometry.transforms if hasattr(t, "scale")]
        return tuple(crop.scale)

    assert crop_scale(tiny_conmim(optim=QUICK)) == (0.08, 1.0)  # the official recipe's
    assert crop_scale(tiny_conmim(crop_scale=(0.25, 1.0), optim=QUICK)) == (0.25, 1.0)
