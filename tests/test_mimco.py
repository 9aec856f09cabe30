"""MimCo stage 2 on tiny ViTs, with a real stage-1 MoCo v3 checkpoint: frozen teacher, losses, errors."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_mim import MimCoModule
from lightning_mim.data import SampleDataModule, TwoCropViews
from lightning_mim.masking import BlockMasking, RandomMasking
from lightning_mim.methods.mimco import MIMCO_MASK_RATIO
from lightning_mim.methods.teachers import projector_out_dim
from lightning_mim.nn import BNProjector

from .helpers import TINY_VIT_4X4, cpu_trainer, flat, losses_on_fixed_batch, tiny_conmim, tiny_mimco, tiny_mocov3


def image_heads(module: MimCoModule) -> list[BNProjector]:
    """The default image head's parts: the projector, then the predictor if there is one."""
    return [cast(BNProjector, head) for head in cast(nn.Sequential, module.image_head)]


def data(**kwargs) -> SampleDataModule:
    return SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8, **kwargs)


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real stage-1 checkpoint: two MoCo v3 steps through the Trainer."""
    folder = tmp_path_factory.mktemp("stage1")
    module = tiny_mocov3()
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
    cpu_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        module, data(train_views=TwoCropViews(32))
    )
    return folder / "last.ckpt"


def test_teacher_is_the_stage1_encoder_and_stays_frozen(stage1_ckpt: Path) -> None:
    stage1 = torch.load(stage1_ckpt, weights_only=True)["state_dict"]
    module = tiny_mimco(teacher_ckpt=str(stage1_ckpt))
    teacher_state = module.teacher.state_dict()
    for name, value in teacher_state.items():
        assert torch.equal(value, stage1[f"base.encoder.{name}"]), name
    assert module.teacher_projector is not None
    assert projector_out_dim(module.teacher_projector) == 16  # stage 1's projection width
    before = flat(module.teacher).clone(), flat(module.teacher_projector).clone()
    modes: list[bool] = []
    module.teacher.blocks[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    trainer = cpu_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, data())
    assert torch.equal(flat(module.teacher), before[0]) and torch.equal(flat(module.teacher_projector), before[1])
    assert modes and not any(modes)  # eval mode throughout training
    assert len(modes) == 3  # one teacher pass per training step, not two
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_patch"]) and torch.isfinite(metrics["train/loss_image"])


def test_student_is_a_mask_token_vit_with_the_default_heads(stage1_ckpt: Path) -> None:
    module = tiny_mimco(teacher_ckpt=str(stage1_ckpt))
    # DEFAULT: the paper's "simple random masking", ratio 0.75 (16 patches: 12 masked)
    assert module.student.mode == "mask_token" and isinstance(module.masking, RandomMasking)
    assert module.masking.mask_ratio == MIMCO_MASK_RATIO == 0.75 and module.masking.num_masking_patches == 12
    assert tiny_mimco(teacher_ckpt=str(stage1_ckpt), mask_ratio=0.5).masking.num_masking_patches == 8
    block = BlockMasking(4, num_masking_patches=6, min_num_patches=2)
    assert tiny_mimco(teacher_ckpt=str(stage1_ckpt), masking=block).masking is block  # block masking stays an option
    patch_head = cast(nn.Sequential, module.patch_head)
    kinds = [type(m).__name__ for m in patch_head]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Linear"] and patch_head[-1].out_features == 48
    assert torch.allclose(module.student.vit.blocks[0].ls1.gamma, torch.full((48,), 0.1))  # layer scale 0.1
    # DEFAULT image head: MoCo v3's ViT projector (3 layers) + predictor (2), both ending in a non-affine BN
    projector, predictor = image_heads(module)
    assert [type(m).__name__ for m in predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert sum(isinstance(m, torch.nn.Linear) for m in projector) == 3 and not projector[-1].affine
    assert module.image_target == "projector" and module.teacher_projector is not None


def test_image_head_and_target_are_arguments(stage1_ckpt: Path) -> None:
    module = tiny_mimco(teacher_ckpt=str(stage1_ckpt), image_proj_layers=2, image_pred_layers=0, image_target="cls")
    (projector,) = image_heads(module)  # no predictor
    assert sum(isinstance(m, torch.nn.Linear) for m in projector) == 2
    assert module.teacher_projector is None and projector[-2].out_features == 48  # the teacher's CLS width
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    _, cls_target = module._teacher_targets(torch.zeros(4, 3, 32, 32))
    assert cls_target.shape == (4, 48)
    assert module.training_step({"images": images}, 0).isfinite()
    with pytest.raises(ValueError, match="image_target"):
        tiny_mimco(teacher_ckpt=str(stage1_ckpt), image_target="pixels")
    with pytest.raises(ValueError, match="image_pred_layers"):
        tiny_mimco(teacher_ckpt=str(stage1_ckpt), image_pred_layers=-1)


def test_loss_falls_on_a_fixed_batch(stage1_ckpt: Path) -> None:
    torch.manual_seed(0)
    module = tiny_mimco(teacher_ckpt=str(stage1_ckpt))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # 30 steps: the default random masking hides 75% of the patches (BEiT blocks hid 38%), so the loss
    # falls more slowly than it did (measured: last/first 0.72 at 30 steps, 0.79 at 20)
    losses = losses_on_fixed_batch(module, {"images": images}, steps=30, lr=2e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_missing_wrong_and_broken_teachers_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"configs/mocov3_vits\.yaml"):
        MimCoModule(backbone_kwargs=TINY_VIT_4X4)
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        MimCoModule(backbone_kwargs=TINY_VIT_4X4, teacher_ckpt=str(tmp_path / "none.ckpt"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        MimCoModule(backbone_kwargs=TINY_VIT_4X4, teacher_ckpt=str(broken))
    conmim = tiny_conmim(proj_hidden_dim=32, proj_dim=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cpu_trainer(max_steps=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]).fit(conmim, data())
    with pytest.raises(ValueError, match=r"not a MoCo v3 checkpoint \(found: conmim\)"):
        MimCoModule(backbone_kwargs=TINY_VIT_4X4, teacher_ckpt=str(tmp_path / "last.ckpt"))


def test_random_teacher_flag_for_smoke_runs() -> None:
    module = tiny_mimco()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert module.training_step({"images": images}, 0).isfinite()
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_teacher_from_a_timm_model_with_local_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_VIT_4X4)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    module = tiny_mimco(
        teacher_arch="vit_small_patch16_224",
        teacher_weights=str(tmp_path / "model.safetensors"),
        teacher_kwargs=TINY_VIT_4X4,
        image_target="cls",
    )
    assert torch.equal(flat(module.teacher), flat(source))
    assert module.teacher_projector is None  # the image-level target is the teacher's CLS feature
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert module.training_step({"images": images}, 0).isfinite()
    with pytest.raises(ValueError, match=r"image_target='projector'.*has no projector"):  # not quietly CLS
        MimCoModule(
            backbone_kwargs=TINY_VIT_4X4,
            teacher_arch="vit_small_patch16_224",
            teacher_weights=str(tmp_path / "model.safetensors"),
            teacher_kwargs=TINY_VIT_4X4,
        )
    with pytest.raises(ValueError, match="does not fit the teacher"):
        MimCoModule(
            backbone_kwargs=TINY_VIT_4X4,
            teacher_arch="vit_small_patch16_224",
            teacher_weights=str(tmp_path / "model.safetensors"),
            teacher_kwargs={**TINY_VIT_4X4, "embed_dim": 64},
        )
