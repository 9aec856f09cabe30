"""The official initialisations of the methods' encoders, as small named functions.

Each function re-initialises a timm model in place as a method's official code initialises its own
at construction. The method modules apply them by default (``init="official"``; ``init="timm"``
keeps timm's initialisation). Initialisation matters beyond the first steps: MoCo v3 freezes its
random patch projection, so that layer keeps its initial scale for the whole run.

Closed forms the tests check: a uniform(-a, a) draw has std a / sqrt(3); xavier-uniform on a
(fan_out, fan_in) matrix has a = sqrt(6 / (fan_in + fan_out)); a normal(0, s) truncated at +-s has
std 0.5396 s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_ as timm_trunc_normal_
from torch import nn

__all__ = ["init_beit_pretraining_", "init_mae_vit_", "init_mocov3_vit_", "trunc_normal_at_one_std_"]


def trunc_normal_at_one_std_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """normal(0, ``std``) truncated at +-``std`` (BEiT's ``trunc_normal_``, whose bounds are one std).

    Drawn by timm's inverse-CDF sampler, as the official code does (torch's own ``trunc_normal_``
    rejection-samples such narrow bounds: 20x slower on a ViT-L).
    """
    return timm_trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


@torch.no_grad()
def init_beit_pretraining_(modules: Iterable[nn.Module], blocks: Sequence[nn.Module], std: float = 0.02) -> None:
    """BEiT's pre-training initialisation, as ConMIM's official code applies it (``modeling_pretrain.py``).

    In every module of ``modules``: each Linear and Conv2d weight (the patch embedding included) is
    normal(0, ``std``) truncated at +-``std`` (effective std 0.5396 ``std``) with zero bias; LayerNorms
    are 1 / 0; ``cls_token``, ``mask_token`` and an absolute ``pos_embed`` are drawn like the weights.
    Then the ``attn.proj`` and ``mlp.fc2`` weights of block ``l`` (counted from 1) are divided by
    sqrt(2 l). BatchNorms, q/v biases, layer scales and relative-position tables keep their
    construction values (1 / 0, zeros, ``init_values``, zeros), as in the official code.

    Args:
        modules: The networks to initialise (ConMIM: the masked encoder and the token projector).
        blocks: The transformer blocks, in depth order, for the depth rescaling.
        std: Standard deviation before truncation (official: 0.02).
    """
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                trunc_normal_at_one_std_(layer.weight, std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.LayerNorm) and layer.elementwise_affine:
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)
        for name, param in module.named_parameters():
            if name.rpartition(".")[2] in ("cls_token", "mask_token", "pos_embed"):
                trunc_normal_at_one_std_(param, std)
    for layer_id, block in enumerate(blocks, start=1):
        block_: Any = block
        block_.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block_.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def _reset_norms(vit: nn.Module) -> None:
    for layer in vit.modules():
        if isinstance(layer, nn.LayerNorm) and layer.elementwise_affine:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_mae_vit_(vit: nn.Module, token_std: float = 0.02) -> None:
    """MAE's encoder initialisation (``models_mae.py initialize_weights``), which CMAE's ``CMAEViT`` repeats.

    Every Linear xavier-uniform with zero bias (the qkv projection as one (3D, D) matrix); the
    patch-embedding kernel xavier-uniform viewed as a (D, C p^2) matrix, its bias PyTorch's Conv2d
    default (neither official code touches it); ``cls_token`` (and a ``mask_token``, if the model
    has one) normal(0, ``token_std``); LayerNorms 1 / 0. Position embeddings are left to the caller
    (the methods fix them to sin-cos tables).

    Args:
        vit: A timm ``VisionTransformer``.
        token_std: Standard deviation of the class and mask tokens (official: 0.02).
    """
    model: Any = vit
    proj = model.patch_embed.proj
    proj.reset_parameters()  # the bias as PyTorch draws it: uniform(+-1 / sqrt(C p^2))
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    for name, param in vit.named_parameters():
        if name in ("cls_token", "mask_token"):
            nn.init.normal_(param, std=token_std)
    for layer in vit.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    _reset_norms(vit)


@torch.no_grad()
def init_mocov3_vit_(vit: nn.Module, cls_std: float = 1e-6) -> None:
    """MoCo v3's ViT initialisation (``vits.py VisionTransformerMoCo.__init__``).

    Every Linear xavier-uniform with zero bias, except the qkv projection, drawn as three separate
    D x D blocks: uniform(+-sqrt(6 / (D + D))); the patch embedding uniform(+-sqrt(6 / (C p^2 + D)))
    with zero bias; ``cls_token`` normal(0, ``cls_std``); LayerNorms 1 / 0. The fixed sin-cos
    position table and the freezing of the patch projection are left to the caller.

    Args:
        vit: A timm ``VisionTransformer``.
        cls_std: Standard deviation of the class token (official: 1e-6).
    """
    model: Any = vit
    for name, layer in vit.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if name.rpartition(".")[2] == "qkv":
            bound = math.sqrt(6.0 / (layer.weight.shape[0] // 3 + layer.weight.shape[1]))
            nn.init.uniform_(layer.weight, -bound, bound)
        else:
            nn.init.xavier_uniform_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    proj = model.patch_embed.proj
    fan_in = proj.weight[0].numel()  # C p^2
    bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=cls_std)
    _reset_norms(vit)
