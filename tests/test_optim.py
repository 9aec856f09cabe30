"""Parameter groups, lr scaling and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from lightning_mim.optim import OptimConfig, param_groups, scaled_lr, warmup_cosine


def test_warmup_cosine_values() -> None:
    assert warmup_cosine(0, 100, 10, 0.01) == 0.0
    assert warmup_cosine(5, 100, 10, 0.01) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the decay
    assert warmup_cosine(100, 100, 10, 0.01) == pytest.approx(0.01)
    assert warmup_cosine(32, 100, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_scaled_lr_rule() -> None:
    assert scaled_lr(1.5e-4, 4096, 256) == pytest.approx(2.4e-3)
    assert scaled_lr(5e-4, 4096, None) == 5e-4


def test_param_groups_no_decay_rules() -> None:
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    groups = param_groups(model, 0.05)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["blocks.0.attn.qkv.weight"]) in decay
    for name in ("pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight"):
        assert id(named[name]) not in decay, name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_layer_decay_uses_timm_scales() -> None:
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == pytest.approx([0.125, 0.25, 0.5, 1.0])  # embed, block 0, block 1, head
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(torch.nn.Linear(2, 2), 0.05, layer_decay=0.5)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        OptimConfig(layer_decay=1.5)
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0.0)
