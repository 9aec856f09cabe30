"""MaskedViT over timm ViT and BEiT, both modes; the BN projector."""

from __future__ import annotations

import pytest
import timm
import torch

from lightning_mim.masking import RandomMasking
from lightning_mim.nn import BNProjector, MaskedViT

from .helpers import TINY_VIT_4X4

VIT = {**TINY_VIT_4X4, "embed_dim": 32}  # 16 patches of 8 px, 32 wide: the shapes below are written for it


def test_mask_token_mode_equals_manual_replacement() -> None:
    model = MaskedViT("vit_small_patch16_224", **VIT).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = RandomMasking(4, 0.5)(2, generator=torch.Generator().manual_seed(0))
    out = model(images, mask)
    assert out.shape == (2, 17, 32)
    # same as timm's own forward_features with the masked embeddings swapped by hand
    vit = model.vit
    x = vit.patch_embed(images)
    x = torch.where(mask[..., None], model.mask_token.expand_as(x), x)
    x = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(x))))
    assert torch.allclose(out, x, atol=1e-5)
    # no mask: exactly timm's forward_features
    assert torch.allclose(model(images), vit.forward_features(images), atol=1e-5)


def test_beit_without_mask_equals_timm() -> None:
    model = MaskedViT(
        "beit_base_patch16_224",
        **VIT,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        global_pool="token",
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(images), model.vit.forward_features(images), atol=1e-5)
    assert "mask_token" in model.no_weight_decay()
    assert "vit.rel_pos_bias.relative_position_bias_table" in model.no_weight_decay()


def test_masked_patches_do_not_leak() -> None:
    model = MaskedViT("vit_small_patch16_224", **VIT).eval()
    images = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    changed = images.clone()
    changed[:, :, 8:16, 8:16] += 5.0  # patch 5 (row 1, col 1) only
    assert torch.allclose(model(images, mask), model(changed, mask), atol=1e-6)


def test_visible_mode_encodes_only_visible_tokens() -> None:
    model = MaskedViT("vit_small_patch16_224", mode="visible", **VIT).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = RandomMasking(4, 0.75)(2, generator=torch.Generator().manual_seed(1))
    out = model(images, mask, num_visible=4)
    assert out.shape == (2, 1 + 4, 32)
    assert torch.equal(out, model(images, mask))  # num_visible inferred when not given
    # equals running timm's blocks on the gathered visible tokens
    vit = model.vit
    x = vit._pos_embed(vit.patch_embed(images))
    keep = torch.stack([torch.nonzero(~m).flatten() for m in mask])  # grid order
    visible = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, 32))
    expected = vit.norm(vit.blocks(torch.cat([x[:, :1], visible], 1)))
    assert torch.allclose(out, expected, atol=1e-5)


def test_visible_mode_rejects_relative_position_bias() -> None:
    with pytest.raises(ValueError, match="visible"):
        MaskedViT("beit_base_patch16_224", mode="visible", **{**VIT, "depth": 1})


def test_bn_projector_flattens_tokens() -> None:
    projector = BNProjector(8, 16, 4, num_layers=3)
    tokens = torch.randn(3, 5, 8)
    out = projector(tokens)
    assert out.shape == (3, 5, 4)
    # BatchNorm statistics run over all B*N tokens: equal to projecting the flattened tokens
    assert torch.allclose(out.reshape(15, 4), projector(tokens.reshape(15, 8)), atol=1e-6)
    assert torch.allclose(out.reshape(15, 4).mean(0), torch.zeros(4), atol=1e-5)  # non-affine last BN


def test_wrong_mask_shape_and_non_vit() -> None:
    model = MaskedViT("vit_small_patch16_224", **VIT)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="needs a timm ViT"):
        MaskedViT("resnet18")
    with pytest.raises(ValueError, match="unknown timm architecture"):
        MaskedViT("no_such_vit")


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "beit_base_patch16_224"])
def test_pool_is_the_mean_of_normed_patch_tokens_or_the_cls_token(arch: str) -> None:
    images = torch.randn(2, 3, 32, 32)
    model = MaskedViT(arch, **VIT).eval()
    tokens = model(images)  # final-normed tokens, as pre-training uses them
    assert torch.allclose(model.pool(tokens), tokens[:, 1:].mean(dim=1), atol=1e-6)
    # timm rebuilt from the recorded arguments pools the same way (what an export reproduces)
    rebuilt = timm.create_model(arch, **model.timm_kwargs).eval()
    rebuilt.load_state_dict(model.vit.state_dict())
    assert torch.allclose(rebuilt(images), model.pool(tokens), atol=1e-5)
    cls = MaskedViT(arch, global_pool="token", **VIT).eval()
    tokens = cls(images)
    assert torch.equal(cls.pool(tokens), tokens[:, 0])


def test_pooling_that_takes_the_norm_off_the_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fc_norm=True moves timm's final norm"):
        MaskedViT("vit_small_patch16_224", fc_norm=True, **VIT)
    with pytest.raises(ValueError, match=r"use_fc_norm=True"):
        MaskedViT("beit_base_patch16_224", use_fc_norm=True, **VIT)
    with pytest.raises(ValueError, match=r"MaskedViT\(timm_kwargs\): global_pool='map'"):
        MaskedViT("vit_small_patch16_224", global_pool="map", **VIT)
