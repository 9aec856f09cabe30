"""Official parity: weight-decay rules, initialisations, recipe batches and 0.1 checkpoints.

Each method's rule and initialisation are checked against what its official code does, as closed
forms: which parameter names take no weight decay (listed by hand from the official rule), the
decoupled decay of one AdamW step, and per-layer weight statistics (a uniform(+-a) draw has std
a / sqrt(3); xavier-uniform has a = sqrt(6 / (fan_in + fan_out)); a normal(0, s) truncated at +-s
has std 0.5396 s).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_mim import ConMIMModule, MimCoModule, MoCoV3Module
from lightning_mim.data import SampleDataModule, TwoCropViews
from lightning_mim.methods.cmae import CMAE_OPTIM, MAE_OPTIM
from lightning_mim.methods.conmim import CONMIM_OPTIM
from lightning_mim.methods.mimco import load_mocov3_teacher
from lightning_mim.methods.moco import MOCOV3_OPTIM
from lightning_mim.nn.init import init_mae_vit_, init_mocov3_vit_, trunc_normal_at_one_std_
from lightning_mim.optim import DECAY_ALL, TIMM_DECAY_RULE, OptimConfig, WeightDecayRule, param_groups

from .helpers import TINY_VIT_4X4, attention_heads, cpu_trainer, tiny_cim, tiny_cmae, tiny_conmim, tiny_mocov3

WIDE_8X8 = {**TINY_VIT_4X4, "patch_size": 4}  # CMAE's and CIM's 8x8 grid here, 48 wide
#: std of a standard normal truncated at +-1: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
TRUNC_AT_ONE = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def quick(config: OptimConfig) -> OptimConfig:
    return dataclasses.replace(config, lr=1e-3, warmup_steps=0, base_batch_size=None)


def data(**kwargs: Any) -> SampleDataModule:
    return SampleDataModule(batch_size=8, num_workers=0, train_size=16, val_size=8, **kwargs)


def no_decay_after_one_step(module: Any, **data_kwargs: Any) -> tuple[set[str], set[str]]:
    """(names with weight decay 0, names with weight decay > 0) in the optimizer a real fit builds."""
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, data(**data_kwargs))
    names = {id(p): n for n, p in module.named_parameters()}
    groups = trainer.optimizers[0].param_groups
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return exempt, decayed


# ------------------------------------------------------------------------------ weight decay
def test_trunc_normal_closed_form() -> None:
    assert pytest.approx(0.5396, abs=1e-4) == TRUNC_AT_ONE
    sample = trunc_normal_at_one_std_(torch.empty(200_000), 0.02)
    assert sample.abs().max() <= 0.02
    assert sample.std().item() == pytest.approx(TRUNC_AT_ONE * 0.02, rel=0.01)


def test_conmim_decay_rule_is_the_official_one() -> None:
    module = tiny_conmim(optim=quick(CONMIM_OPTIM))
    exempt, decayed = no_decay_after_one_step(module)
    per_block = [
        "attn.proj.bias", "attn.q_bias", "attn.v_bias", "gamma_1", "gamma_2", "mlp.fc1.bias", "mlp.fc2.bias",
        "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight",
    ]  # fmt: skip
    expected = {f"student.encoder.vit.blocks.{i}.{name}" for i in range(2) for name in per_block} | {
        "student.encoder.vit.cls_token",
        "student.encoder.vit.norm.bias",
        "student.encoder.vit.norm.weight",
        "student.encoder.vit.patch_embed.proj.bias",
        "student.projector.1.bias",  # BatchNorms: 1-D
        "student.projector.1.weight",
        "student.projector.4.bias",
        "student.projector.4.weight",
    }
    assert exempt == expected
    # decayed although timm's no_weight_decay() would exempt them: 3-D and 2-D, not named in the skip list
    assert {"student.encoder.mask_token", "student.encoder.vit.rel_pos_bias.relative_position_bias_table"} <= decayed


def test_mocov3_decays_every_parameter() -> None:
    module = tiny_mocov3(optim=quick(MOCOV3_OPTIM))
    exempt, decayed = no_decay_after_one_step(module, train_views=TwoCropViews(32))
    assert exempt == set()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert decayed == trainable  # biases, norms, BatchNorms and the class token included
    assert {"base.encoder.cls_token", "base.encoder.blocks.0.norm1.weight", "predictor.1.bias"} <= decayed


def test_decoupled_decay_of_one_adamw_step_follows_the_rule() -> None:
    """With zero gradients, one AdamW step multiplies decayed parameters by 1 - lr * wd, exactly."""
    module = tiny_mocov3()
    model = nn.ModuleDict({"base": module.base, "predictor": module.predictor})
    for rule, scaled in ((DECAY_ALL, "all"), (TIMM_DECAY_RULE, "matrices but the class token")):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(param_groups(model, 0.1, rule=rule), lr=0.5)
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        optimizer.step()
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            matrix = param.ndim > 1 and not name.endswith(("bias", "cls_token", "pos_embed"))
            factor = 0.95 if scaled == "all" or matrix else 1.0
            assert torch.allclose(param, before[name] * factor, rtol=1e-6, atol=0), (rule, name)
            param.data.copy_(before[name])


ENCODER_BLOCK = [
    "attn.proj.bias", "attn.qkv.bias", "mlp.fc1.bias", "mlp.fc2.bias", "norm1.bias", "norm1.weight", "norm2.bias",
    "norm2.weight",
]  # fmt: skip


def _decoder(prefix: str) -> set[str]:
    return {f"{prefix}.blocks.0.{n}" for n in ENCODER_BLOCK} | {
        f"{prefix}.{n}" for n in ("embed.bias", "head.bias", "norm.bias", "norm.weight")
    }


def test_cmae_decay_rule_is_the_official_one() -> None:
    from lightning_mim.data import CMAEViews

    module = tiny_cmae(backbone_kwargs=WIDE_8X8, feature_decoder_depth=1, optim=quick(CMAE_OPTIM))
    exempt, decayed = no_decay_after_one_step(module, train_views=CMAEViews(size=32, shift=4))
    encoder = {f"online_encoder.vit.blocks.{i}.{n}" for i in range(2) for n in ENCODER_BLOCK} | {
        "online_encoder.vit.cls_token",
        "online_encoder.vit.norm.bias",
        "online_encoder.vit.norm.weight",
        "online_encoder.vit.patch_embed.proj.bias",
    }
    heads = {f"online_heads.{h}.{i}.bias" for h in ("projector", "predictor") for i in (0, 1)}
    expected = (
        encoder
        | _decoder("pixel_decoder")
        | _decoder("online_heads.feature_decoder")
        | {"pixel_decoder.mask_token", "online_heads.feature_decoder.mask_token"}
        | heads
    )
    assert exempt == expected
    # The BatchNorm weights of projector and predictor match none of the official name rules: decayed.
    assert {"online_heads.projector.1.weight", "online_heads.predictor.1.weight"} <= decayed


def test_mae_decay_rule_is_the_official_one() -> None:
    from lightning_mim.data import MAEViews

    module = tiny_cmae(
        backbone_kwargs=WIDE_8X8, feature_decoder_depth=1, contrastive_weight=0.0, optim=quick(MAE_OPTIM)
    )
    exempt, decayed = no_decay_after_one_step(module, train_views=MAEViews(size=32))
    expected = (
        {f"online_encoder.vit.blocks.{i}.{n}" for i in range(2) for n in ENCODER_BLOCK}
        | {"online_encoder.vit.norm.bias", "online_encoder.vit.norm.weight", "online_encoder.vit.patch_embed.proj.bias"}
        | _decoder("pixel_decoder")
    )
    assert exempt == expected
    assert {"online_encoder.vit.cls_token", "pixel_decoder.mask_token"} <= decayed  # 3-D, no skip list in MAE


def test_methods_without_official_code_keep_timms_rule_and_rules_are_configurable() -> None:
    from lightning_mim.methods.cim import CIM_OPTIM
    from lightning_mim.methods.mimco import MIMCO_OPTIM

    assert MIMCO_OPTIM.decay_rule == CIM_OPTIM.decay_rule == TIMM_DECAY_RULE  # DEFAULT, as before 0.2
    vit = timm.create_model("vit_small_patch16_224", num_classes=3, **TINY_VIT_4X4)
    assert WeightDecayRule(one_dim=False, bias=False, names=("cls_token",), module_hooks=False).exempt_names(vit) == {
        "cls_token"
    }
    assert WeightDecayRule(one_dim=False, bias=False, substrings=("norm",), module_hooks=False).exempt_names(vit) == {
        f"{m}.{p}" for m in ("blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm")
        for p in ("weight", "bias")
    }  # fmt: skip
    # A plain dict (checkpoint hyperparameters, YAML) becomes the dataclass.
    config = OptimConfig(decay_rule={"one_dim": False, "bias": False, "names": ["cls_token"]})  # type: ignore[arg-type]
    assert config.decay_rule == WeightDecayRule(one_dim=False, bias=False, names=("cls_token",))


def test_layer_decay_groups_follow_the_rule() -> None:
    vit = timm.create_model("vit_small_patch16_224", num_classes=3, **TINY_VIT_4X4)
    groups = param_groups(vit, 0.05, layer_decay=0.5, rule=DECAY_ALL)
    assert all(g["weight_decay"] == 0.05 for g in groups)
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.125, 0.25, 0.5, 1.0])
    timm_groups = param_groups(vit, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in vit.named_parameters()}
    exempt = {names[id(p)] for g in timm_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert exempt == TIMM_DECAY_RULE.exempt_names(vit) and "cls_token" in exempt and "head.weight" not in exempt


# ---------------------------------------------------------------------------- initialisation
def _uniform_std(bound: float) -> float:
    return bound / math.sqrt(3)


def _check_uniform(weight: torch.Tensor, bound: float) -> None:
    assert weight.abs().max().item() <= bound * (1 + 1e-6)
    assert weight.std().item() == pytest.approx(_uniform_std(bound), rel=0.03)


@pytest.mark.parametrize(("arch", "patch_std"), [("vit_small_patch16_224", 0.0417), ("vit_base_patch16_224", 0.0361)])
def test_mocov3_initialisation_closed_forms(arch: str, patch_std: float) -> None:
    vit: Any = timm.create_model(arch, num_classes=0, depth=2)
    init_mocov3_vit_(vit)
    dim = vit.embed_dim
    patch_bound = math.sqrt(6 / (3 * 16 * 16 + dim))
    _check_uniform(vit.patch_embed.proj.weight, patch_bound)
    assert vit.patch_embed.proj.weight.std().item() == pytest.approx(patch_std, rel=0.03)  # frozen: permanent
    assert torch.all(vit.patch_embed.proj.bias == 0)
    for block in vit.blocks:
        for q_k_or_v in block.attn.qkv.weight.chunk(3, dim=0):  # three D x D blocks, each xavier on its own
            _check_uniform(q_k_or_v, math.sqrt(6 / (dim + dim)))
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            _check_uniform(linear.weight, math.sqrt(6 / (linear.in_features + linear.out_features)))
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert torch.all(linear.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert vit.cls_token.abs().max().item() < 1e-5  # normal(0, 1e-6)


def test_mocov3_module_applies_the_official_init_by_default() -> None:
    official = MoCoV3Module(proj_hidden_dim=64, proj_dim=16, backbone_kwargs={"depth": 1})
    official_patch = cast(VisionTransformer, official.encoder()).patch_embed.proj
    assert official_patch.weight.std().item() == pytest.approx(0.0417, rel=0.03)
    timm_init = MoCoV3Module(proj_hidden_dim=64, proj_dim=16, backbone_kwargs={"depth": 1}, init="timm")
    timm_patch = cast(VisionTransformer, timm_init.encoder()).patch_embed.proj
    assert timm_patch.weight.std().item() < 0.03  # timm's conv init: about 0.021
    assert torch.equal(
        torch.cat([p.flatten() for p in official.base.parameters()]),
        torch.cat([p.flatten() for p in official.momentum_branch.parameters()]),
    )  # the momentum copy starts from the initialised base
    with pytest.raises(ValueError, match="init"):
        MoCoV3Module(backbone_kwargs=TINY_VIT_4X4, init="xavier")  # type: ignore[arg-type]


def test_conmim_initialisation_is_beits_truncated_normal_with_depth_rescaling() -> None:
    kwargs: dict[str, Any] = {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 3, "num_heads": 3}
    module = ConMIMModule(backbone_kwargs=kwargs, proj_hidden_dim=512, proj_dim=64)
    encoder, projector = module.student.encoder, cast(nn.Sequential, module.student.projector)
    std = TRUNC_AT_ONE * 0.02  # 0.0108

    def check(weight: torch.Tensor, scale: float = 1.0) -> None:
        assert weight.abs().max().item() <= 0.02 * scale * (1 + 1e-6)
        assert weight.std().item() == pytest.approx(std * scale, rel=0.03)

    check(encoder.vit.patch_embed.proj.weight)
    assert torch.all(encoder.vit.patch_embed.proj.bias == 0)
    for layer_id, block in enumerate(encoder.vit.blocks, start=1):
        check(block.attn.qkv.weight)
        check(block.mlp.fc1.weight)
        check(block.attn.proj.weight, 1 / math.sqrt(2 * layer_id))  # BEiT's fix_init_weight
        check(block.mlp.fc2.weight, 1 / math.sqrt(2 * layer_id))
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.mlp.fc1.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm2.bias == 0)
        assert torch.allclose(block.gamma_1, torch.full((192,), 0.1))  # layer scale untouched
    for linear in (m for m in projector if isinstance(m, nn.Linear)):
        check(linear.weight)  # the projector too, as the official model's apply(_init_weights)
    for token in (encoder.vit.cls_token, encoder.mask_token):
        assert token.abs().max().item() <= 0.02 and token.std().item() == pytest.approx(std, rel=0.2)
    assert torch.all(encoder.vit.rel_pos_bias.relative_position_bias_table == 0)
    assert torch.equal(module.teacher.encoder.mask_token, encoder.mask_token)  # copied after the init
    timm_init = ConMIMModule(backbone_kwargs=kwargs, proj_hidden_dim=512, proj_dim=64, init="timm")
    assert timm_init.student.encoder.vit.blocks[0].attn.qkv.weight.std().item() > 0.018  # timm's 0.02


def test_cmae_encoder_initialisation_is_maes_xavier() -> None:
    kwargs: dict[str, Any] = {"img_size": 64, "patch_size": 8, "embed_dim": 384, "depth": 2, "num_heads": 6}
    module = tiny_cmae(
        backbone_kwargs=kwargs, decoder_dim=64, feature_decoder_depth=1, decoder_heads=4, optim=quick(CMAE_OPTIM)
    )
    vit: Any = module.online_encoder.vit
    patch = vit.patch_embed.proj
    fan_in = 3 * 8 * 8
    _check_uniform(patch.weight, math.sqrt(6 / (384 + fan_in)))  # xavier on the (D, 3 p^2) matrix
    # the bias keeps PyTorch's Conv2d draw, uniform(+-1 / sqrt(fan_in)): neither official code zeroes it
    assert patch.bias.abs().max().item() <= 1 / math.sqrt(fan_in) and patch.bias.abs().max().item() > 0
    for block in vit.blocks:
        _check_uniform(block.attn.qkv.weight, math.sqrt(6 / (384 + 3 * 384)))  # qkv as one matrix
        _check_uniform(block.mlp.fc1.weight, math.sqrt(6 / (384 + 1536)))
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.mlp.fc2.bias == 0)
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(module.target_encoder.vit.cls_token, vit.cls_token)
    raw: Any = timm.create_model("vit_small_patch16_224", num_classes=0, **kwargs)
    init_mae_vit_(raw)
    _check_uniform(raw.blocks[1].attn.proj.weight, math.sqrt(6 / (384 + 384)))
    timm_init = tiny_cmae(backbone_kwargs=WIDE_8X8, feature_decoder_depth=1, init="timm", optim=quick(CMAE_OPTIM))
    assert timm_init.online_encoder.vit.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.15)


# -------------------------------------------------------------------------- recipe batches
def test_a_run_at_another_global_batch_warns_with_the_flag_that_restores_it() -> None:
    def fit(recipe: int | None, base: int | None = None) -> None:
        optim = dataclasses.replace(quick(CONMIM_OPTIM), recipe_batch_size=recipe, base_batch_size=base)
        module = tiny_conmim(optim=optim)
        cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, data())

    with pytest.warns(UserWarning, match=r"global batch is 8 .*recipe's is 32") as record:
        fit(32)
    message = str(next(w.message for w in record if "recipe's is 32" in str(w.message)))
    assert "--trainer.num_nodes 4" in message and "--trainer.accumulate_grad_batches 4" in message
    assert "absolute" in message  # ConMIM's lr does not follow the batch
    with pytest.warns(UserWarning, match=r"--data.batch_size 12"):
        fit(12)
    with pytest.warns(UserWarning, match=r"scaled linearly"):
        fit(32, base=256)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(8)  # the recipe's batch: silent
        fit(None)  # no recipe batch: nothing to check
    assert not [w for w in caught if "recipe_batch_size" in str(w.message)]
    with pytest.raises(ValueError, match="recipe_batch_size"):
        OptimConfig(recipe_batch_size=0)


# ----------------------------------------------------------------------- 0.1 checkpoints
def _fit_and_save(module: Any, folder: Path, **data_kwargs: Any) -> Path:
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, data(**data_kwargs))
    return folder / "last.ckpt"


def _as_version_0_1(path: Path, drop_heads: bool = False, encoders_entry: bool = True) -> Path:
    """The checkpoint as lightning-mim 0.1 wrote it: no decay_rule in the optim hyperparameters, no final
    predictor BatchNorm statistics (MoCo v3), no recorded head count (0.1 built timm's default); the
    0.1.0 release recorded no encoders entry either (``encoders_entry=False``)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["lightning_mim"].pop("version")
    if not encoders_entry:
        checkpoint["lightning_mim"].pop("encoders")
    checkpoint["hyper_parameters"]["optim"].pop("decay_rule")
    checkpoint["hyper_parameters"]["optim"].pop("recipe_batch_size")
    for key in [k for k in checkpoint["state_dict"] if k.startswith("predictor.4.")]:
        del checkpoint["state_dict"][key]
    if drop_heads:
        checkpoint["hyper_parameters"]["backbone_kwargs"].pop("num_heads")
        for entry in checkpoint["lightning_mim"].get("encoders", {}).values():
            entry["model_args"].pop("num_heads", None)
    old = path.with_name(f"v0.1{'' if encoders_entry else '.0'}.ckpt")
    torch.save(checkpoint, old)
    return old


def test_mocov3_checkpoints_of_version_0_1_resume_and_teach(tmp_path: Path) -> None:
    # 0.1 grouped every method's parameters by timm's rule: its optimizer state has two groups
    written = tiny_mocov3(optim=dataclasses.replace(quick(MOCOV3_OPTIM), decay_rule=TIMM_DECAY_RULE))
    old = _as_version_0_1(_fit_and_save(written, tmp_path, train_views=TwoCropViews(32)))
    module = tiny_mocov3(optim=quick(MOCOV3_OPTIM))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    with pytest.warns(UserWarning) as record:
        trainer.fit(module, data(train_views=TwoCropViews(32)), ckpt_path=old)
    messages = " ".join(str(w.message) for w in record)
    assert "final BatchNorm" in messages and "lightning-mim 0.1" in messages
    assert trainer.global_step == 2 and module.optim.decay_rule == TIMM_DECAY_RULE  # resumed with its own groups
    assert len(trainer.optimizers[0].param_groups) == 2
    teacher = load_mocov3_teacher(old)  # stage 2 from a 0.1 stage-1 checkpoint
    predictor = cast(nn.Sequential, teacher.predictor)
    linear, batch_norm = cast(nn.Linear, predictor[3]), cast(nn.BatchNorm1d, predictor[4])
    assert torch.equal(linear.weight, torch.load(old, weights_only=True)["state_dict"]["predictor.3.weight"])
    assert batch_norm.running_var is not None and torch.all(batch_norm.running_var == 1)


def test_six_head_vit_s_of_version_0_1_is_not_loaded_as_twelve_heads(tmp_path: Path) -> None:
    vit_s = {"img_size": 32, "patch_size": 8, "depth": 1}
    timm_rule = dataclasses.replace(quick(MOCOV3_OPTIM), decay_rule=TIMM_DECAY_RULE)  # 0.1's optimizer groups
    written = MoCoV3Module(backbone_kwargs={**vit_s, "num_heads": 6}, proj_hidden_dim=64, proj_dim=16, optim=timm_rule)
    saved = _fit_and_save(written, tmp_path, train_views=TwoCropViews(32))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    written.eval()
    for encoders_entry in (False, True):  # the 0.1.0 release, and later 0.1 checkpoints
        old = _as_version_0_1(saved, drop_heads=True, encoders_entry=encoders_entry)
        teacher = load_mocov3_teacher(old)  # rebuilt with the 6 heads it was trained with
        assert attention_heads(teacher.encoder()) == 6
        assert torch.allclose(teacher.embed(images), written.embed(images), atol=1e-5)
    stage2 = MimCoModule(backbone_kwargs=vit_s, teacher_ckpt=str(old), patch_hidden_dim=32, proj_hidden_dim=64)
    assert stage2.teacher.blocks[0].attn.num_heads == 6
    # A module built with today's default (12 heads) refuses it instead of running it wrongly.
    module = MoCoV3Module(backbone_kwargs=vit_s, proj_hidden_dim=64, proj_dim=16)
    assert attention_heads(module.encoder()) == 12
    for old in (tmp_path / "v0.1.ckpt", tmp_path / "v0.1.0.ckpt"):
        with pytest.raises(ValueError, match=r"differ in \['num_heads'\].*num_heads: 6"):
            cpu_trainer(max_steps=2, limit_val_batches=0).fit(module, data(train_views=TwoCropViews(32)), ckpt_path=old)
    module = MoCoV3Module(backbone_kwargs={**vit_s, "num_heads": 6}, proj_hidden_dim=64, proj_dim=16)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, data(train_views=TwoCropViews(32)), ckpt_path=tmp_path / "v0.1.0.ckpt")  # as the hint says
    assert trainer.global_step == 2
    # A 12-head checkpoint teaches a 12-head teacher (the mimco_vits recipe and mocov3_vits's teacher).
    new = _fit_and_save(
        MoCoV3Module(backbone_kwargs=vit_s, proj_hidden_dim=64, proj_dim=16),
        tmp_path / "new",
        train_views=TwoCropViews(32),
    )
    stage2 = MimCoModule(backbone_kwargs=vit_s, teacher_ckpt=str(new), patch_hidden_dim=32, proj_hidden_dim=64)
    assert stage2.teacher.blocks[0].attn.num_heads == 12


def test_conmim_and_cmae_checkpoints_of_version_0_1_resume(tmp_path: Path) -> None:
    timm_rule = dataclasses.replace(quick(CONMIM_OPTIM), decay_rule=TIMM_DECAY_RULE)
    written = tiny_conmim(optim=timm_rule)
    old = _as_version_0_1(_fit_and_save(written, tmp_path))
    module = tiny_conmim(optim=quick(CONMIM_OPTIM))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match="lightning-mim 0.1"):
        trainer.fit(module, data(), ckpt_path=old)
    assert trainer.global_step == 2 and module.optim.decay_rule == TIMM_DECAY_RULE
    # A checkpoint of this version resumes with the official rule, silently.
    new = _fit_and_save(tiny_conmim(optim=quick(CONMIM_OPTIM)), tmp_path / "new")
    module = tiny_conmim(optim=quick(CONMIM_OPTIM))
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(module, data(), ckpt_path=new)
    assert module.optim.decay_rule == CONMIM_OPTIM.decay_rule
    # CMAE likewise
    from lightning_mim.data import CMAEViews

    written_cmae = tiny_cmae(
        backbone_kwargs=WIDE_8X8,
        feature_decoder_depth=1,
        optim=dataclasses.replace(quick(CMAE_OPTIM), decay_rule=TIMM_DECAY_RULE),
    )
    old = _as_version_0_1(_fit_and_save(written_cmae, tmp_path / "cmae", train_views=CMAEViews(size=32, shift=4)))
    module_cmae = tiny_cmae(backbone_kwargs=WIDE_8X8, feature_decoder_depth=1, optim=quick(CMAE_OPTIM))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match="lightning-mim 0.1"):
        trainer.fit(module_cmae, data(train_views=CMAEViews(size=32, shift=4)), ckpt_path=old)
    assert trainer.global_step == 2


def test_cim_module_is_untouched_by_the_rules() -> None:
    """CIM has no official code: its rule stays timm's (DEFAULT) and its networks keep their init."""
    module = tiny_cim(enhancer_kwargs=WIDE_8X8, masking=None)  # the default masking
    assert module.optim.decay_rule == TIMM_DECAY_RULE
