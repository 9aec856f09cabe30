"""The published settings of every method: optimiser recipes, weight-decay rules, backbone defaults.

Each constant says where its numbers come from: the official code, the paper, or (marked DEFAULT or
"chosen") a default of ours where the sources are silent. The method modules take them as their
defaults; a config overrides any field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_mim.masking import GridMasking
from lightning_mim.methods._validation import check_choice
from lightning_mim.nn.init import init_mae_vit_
from lightning_mim.nn.masked_vit import MaskedViT
from lightning_mim.nn.pos_embed import SinCosOrder, freeze_sincos_pos_embed
from lightning_mim.nn.timm_models import TimmArgs
from lightning_mim.optim import DECAY_ALL, OptimConfig, WeightDecayRule

# ---- conmim

#: BEiT-style backbone of the official code: shared relative position bias, no absolute position
#: embedding, layer-scale 0.1 (use 1e-5 for ViT-L), no drop path.
CONMIM_BACKBONE_DEFAULTS: dict[str, Any] = {
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": False,
    "use_shared_rel_pos_bias": True,
    "init_values": 0.1,
    "drop_path_rate": 0.0,
}

#: The official weight-decay rule (BEiT's optim_factory with the model's ``no_weight_decay()``): no decay
#: on 1-D parameters, biases, ``pos_embed`` and ``cls_token``, and nothing else: the mask token and
#: the shared relative-position-bias table are decayed.
CONMIM_DECAY_RULE = WeightDecayRule(one_dim=True, bias=True, names=("pos_embed", "cls_token"), module_hooks=False)

#: The official optimiser settings: lr 5e-4 (absolute), AdamW (0.9, 0.98), wd 0.05 by
#: ``CONMIM_DECAY_RULE``, 5 warmup epochs, cosine to 1e-5.
CONMIM_OPTIM = OptimConfig(
    lr=5e-4, min_lr=1e-5, weight_decay=0.05, decay_rule=CONMIM_DECAY_RULE, betas=(0.9, 0.98), warmup_epochs=5.0
)

# ---- cmae

#: CMAE's official rule (mmengine ``custom_keys`` with decay_mult 0): parameters whose name contains
#: 'ln', 'bias', 'pos_embed', 'mask_token' or 'cls_token'. The official model names every LayerNorm
#: ``ln*``; timm names them ``norm*``, hence 'norm' here. The projector's and predictor's BatchNorm
#: weights match none of these and ARE decayed (their biases are not).
CMAE_DECAY_RULE = WeightDecayRule(
    one_dim=False,
    bias=False,
    substrings=("norm", "bias", "pos_embed", "mask_token", "cls_token"),
    module_hooks=False,
)

#: The official ViT-B recipe: lr 1.5e-4 per 256 images (2.4e-3 at 4096), AdamW (0.9, 0.95), wd 0.05
#: by ``CMAE_DECAY_RULE``, 40 warmup epochs, cosine to 0.
CMAE_OPTIM = OptimConfig(
    lr=1.5e-4,
    base_batch_size=256,
    min_lr=0.0,
    weight_decay=0.05,
    decay_rule=CMAE_DECAY_RULE,
    betas=(0.9, 0.95),
    warmup_epochs=40,
)

#: MAE's rule (facebookresearch/mae ``main_pretrain.py``: timm 0.3's ``add_weight_decay`` with no skip
#: list): no decay on 1-D parameters and biases only; the class and mask tokens are decayed.
MAE_DECAY_RULE = WeightDecayRule(one_dim=True, bias=True, module_hooks=False)

#: MAE's recipe, for ``CMAEModule(contrastive_weight=0)``: as ``CMAE_OPTIM`` but with ``MAE_DECAY_RULE``.
MAE_OPTIM = dataclasses.replace(CMAE_OPTIM, decay_rule=MAE_DECAY_RULE)


def mae_encoder(
    owner: str, backbone: str, backbone_kwargs: dict[str, Any] | None, init: str, order: SinCosOrder = "columns_first"
) -> MaskedViT:
    """MAE's (and CMAE's) encoder on the visible patches, with the fixed sin-cos position table.

    ``init="official"``: MAE's initialisation (:func:`~lightning_mim.nn.init.init_mae_vit_`); ``"timm"``
    keeps timm's. ``order``: the table's layout (MAE: columns first; CMAE: rows first).
    """
    check_choice(owner, ("official", "timm"), init=init)
    names = TimmArgs(owner, "backbone", "backbone_kwargs")
    encoder = MaskedViT(backbone, mode="visible", names=names, **(backbone_kwargs or {}))
    if init == "official":
        init_mae_vit_(encoder.vit)
    if encoder.vit.pos_embed is None:
        raise ValueError(f"{owner}(backbone={backbone!r}): has no absolute position embedding to fix to sin-cos")
    freeze_sincos_pos_embed(encoder.vit.pos_embed, encoder.grid_size, order)
    return encoder


def default_cmae_masking(owner: str, grid: tuple[int, int]) -> GridMasking:
    """CMAE's masking: 2x2-patch cells at ratio 0.65 (an even patch grid needed)."""
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(
            f"{owner}(backbone_kwargs): the default masking (2x2-patch cells) needs an even patch grid, got "
            f"{grid}; pass another masking generator (e.g. RandomMasking) or change img_size / patch_size"
        )
    return GridMasking(grid, cell_size=2, mask_ratio=0.65)


# ---- moco

#: MoCo v3's ViT recipe: AdamW, lr 1.5e-4 per 256 images, wd 0.1 on every parameter (main_moco.py:
#: ``AdamW(model.parameters(), ...)``: biases, norms and the class token included), 40 warmup
#: epochs, cosine to 0.
MOCOV3_OPTIM = OptimConfig(
    lr=1.5e-4, base_batch_size=256, min_lr=0.0, weight_decay=0.1, decay_rule=DECAY_ALL, warmup_epochs=40
)

#: Attention heads of the official ViTs where timm's differ: MoCo v3's ``vit_small`` has 12 heads of
#: width 32, timm's ``vit_small_*`` 6 of width 64. Applied unless ``backbone_kwargs`` sets ``num_heads``.
MOCOV3_VIT_HEADS = {"vit_small_": 12}

# ---- mimco

#: DEFAULT (BEiT-like): lr 1.5e-3 per 2048 images, AdamW (0.9, 0.999), wd 0.05, 10 warmup epochs, cosine.
MIMCO_OPTIM = OptimConfig(lr=1.5e-3, base_batch_size=2048, min_lr=1e-5, weight_decay=0.05, warmup_epochs=10)

#: DEFAULT ratio of the paper's "simple random masking strategy": the paper ablates the ratio, and
#: the value it settles on is not confirmed here; 0.75 is MAE's and ConMIM ViT-L's random ratio.
MIMCO_MASK_RATIO = 0.75

# ---- cim

#: Chosen defaults (BEiT-like): AdamW (0.9, 0.999), lr 1.5e-3 per 2048 images, wd 0.05, 10 warmup
#: epochs, cosine to 1e-5.
CIM_OPTIM = OptimConfig(
    lr=1.5e-3, base_batch_size=2048, min_lr=1e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup_epochs=10
)

# ---- tokenizer

#: Chosen defaults (no official tokenizer recipe exists for CIM): AdamW lr 3e-4, no weight decay,
#: betas (0.9, 0.99), 1 warmup epoch, cosine to 1e-5.
VQ_TOKENIZER_OPTIM = OptimConfig(
    lr=3e-4, base_batch_size=None, min_lr=1e-5, weight_decay=0.0, betas=(0.9, 0.99), warmup_epochs=1
)

# ---- finetune

#: The ConMIM/BEiT ViT-B fine-tuning recipe: AdamW (0.9, 0.999), lr 4e-3 per 1024 images, wd 0.05,
#: layer decay 0.65, 20 warmup epochs, cosine to 1e-6.
FINETUNE_OPTIM = OptimConfig(
    lr=4e-3,
    base_batch_size=1024,
    min_lr=1e-6,
    weight_decay=0.05,
    betas=(0.9, 0.999),
    warmup_epochs=20,
    layer_decay=0.65,
)

#: MAE's linear probe: LARS, lr 0.1 per 256 images, no weight decay, 10 warmup epochs, cosine to 0.
LINEAR_OPTIM = OptimConfig(lr=0.1, base_batch_size=256, min_lr=0.0, weight_decay=0.0, warmup_epochs=10)
