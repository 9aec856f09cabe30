"""MoCoV3Module (MimCo stage 1) on a tiny ViT: structure, symmetric loss, momentum branch, views."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_mim import MoCoV3Module
from lightning_mim.data import SampleDataModule, TwoCropViews
from lightning_mim.losses import info_nce
from lightning_mim.nn import sincos_2d_pos_embed

from .helpers import attention_heads, cpu_trainer, flat, losses_on_fixed_batch, tiny_mocov3


def batch(size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g)
    return {"images": images, "images_2": images.flip(-1)}


def official_sincos(grid: int, dim: int) -> torch.Tensor:
    """MoCo v3's build_2d_sincos_position_embedding, written from its definition: an 'ij' meshgrid of
    (w, h) coordinates, channels sin(w), cos(w), sin(h), cos(h), omega = 1 / 10000^(i / (dim / 4))."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def test_structure_follows_moco_v3() -> None:
    module = MoCoV3Module(proj_hidden_dim=4096)  # ViT-S/16
    encoder = cast(VisionTransformer, module.encoder())
    assert attention_heads(encoder) == 12  # the official vit_small (timm's has 6)
    assert not any(p.requires_grad for p in encoder.patch_embed.parameters())  # frozen random patch projection
    pos_embed = encoder.pos_embed
    assert pos_embed is not None and not pos_embed.requires_grad
    assert torch.allclose(pos_embed, official_sincos(14, 384), atol=1e-6)  # rows first, as MoCo v3
    assert not torch.allclose(pos_embed, sincos_2d_pos_embed((14, 14), 384))  # MAE's order differs
    projector = cast(nn.Sequential, module.projector)
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not projector[-1].affine
    # The ViT predictor is _build_mlp(2, 256, 4096, 256) with last_bn=True: it ends in a non-affine BN.
    predictor = cast(nn.Sequential, module.predictor)
    assert [type(m).__name__ for m in predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not predictor[-1].affine and predictor[1].affine
    assert all(m.bias is None for m in predictor if isinstance(m, nn.Linear))
    assert projector[0].out_features == 4096 and predictor[3].out_features == 256
    assert attention_heads(MoCoV3Module(backbone_kwargs={"num_heads": 6}).encoder()) == 6  # timm's ViT-S
    assert attention_heads(MoCoV3Module(backbone="vit_base_patch16_224", proj_hidden_dim=64).encoder()) == 12


def test_predictor_output_is_standardised_per_dimension_in_train_mode() -> None:
    torch.manual_seed(0)
    module = tiny_mocov3().train()
    out = module.predictor(torch.randn(64, 16) * 3 + 1)  # (B, proj_dim)
    assert torch.allclose(out.mean(dim=0), torch.zeros(16), atol=1e-5)
    # BatchNorm divides by the biased batch std (with eps 1e-5): unit variance per dimension.
    assert torch.allclose(out.var(dim=0, unbiased=False), torch.ones(16), atol=1e-3)


def test_crops_are_bilinear_as_the_official_code() -> None:
    from torchvision.transforms import InterpolationMode

    views = tiny_mocov3().train_views()
    crops = [views.first.transforms[0], views.second.transforms[0]]
    assert all(crop.interpolation == InterpolationMode.BILINEAR for crop in crops)
    assert TwoCropViews(32, interpolation="bicubic").first.transforms[0].interpolation == InterpolationMode.BICUBIC
    with pytest.raises(ValueError, match="interpolation"):
        TwoCropViews(32, interpolation="nearest")  # type: ignore[arg-type]


def test_loss_is_symmetric_scaled_infonce() -> None:
    module = tiny_mocov3()
    data = batch()
    loss = module.training_step(data, 0)
    from lightning_mim.data import normalize

    x1, x2 = normalize(data["images"]), normalize(data["images_2"])
    with torch.no_grad():
        q1, q2 = module.predictor(module.base(x1)), module.predictor(module.base(x2))
        k1, k2 = module.momentum_branch(x1), module.momentum_branch(x2)
    expected = 0.4 * (info_nce(q1, k2, 0.2) + info_nce(q2, k1, 0.2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # identical embeddings everywhere: each term is 2 tau ln B
    same = torch.ones(8, 16)
    assert (0.4 * info_nce(same, same, 0.2)).item() == pytest.approx(0.4 * math.log(8), abs=1e-6)


def test_momentum_branch_gets_no_gradients_and_follows_ema() -> None:
    module = tiny_mocov3()
    module.training_step(batch(), 0).backward()
    assert all(p.grad is None for p in module.momentum_branch.parameters())
    assert all(p.grad is None for p in cast(VisionTransformer, module.encoder()).patch_embed.parameters())
    dm = SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8, train_views=TwoCropViews(32))
    module = tiny_mocov3(momentum=0.0, final_momentum=0.0)
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(module, dm)
    assert torch.equal(flat(module.momentum_branch), flat(module.base))  # momentum 0 copies base + projector
    module = tiny_mocov3(momentum=1.0, final_momentum=1.0)
    frozen = flat(module.momentum_branch).clone()
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(module, dm)
    assert torch.equal(flat(module.momentum_branch), frozen)


def test_learns_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    module = tiny_mocov3()
    data = batch(16)
    losses = losses_on_fixed_batch(module, data, steps=20, lr=2e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_two_views_differ_and_have_the_right_shape() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    out = TwoCropViews(size=32)(image)
    assert out["images"].shape == out["images_2"].shape == (3, 32, 32)
    assert out["images"].dtype == torch.uint8 and not torch.equal(out["images"], out["images_2"])


def test_checkpoint_kind_and_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not a MoCo v3 checkpoint"):
        tiny_mocov3().on_load_checkpoint({"lightning_mim": {"method": "conmim"}})
    with pytest.raises(ValueError, match="unknown timm architecture"):
        MoCoV3Module(backbone="nope_vit")
    with pytest.raises(ValueError, match="temperature"):
        tiny_mocov3(temperature=0.0)
