"""Official MoCo v3 checkpoints: converted, exported, and used as MimCo's teacher without a stage 1."""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import re
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from lightning_mim import CMAEModule, ConMIMModule, FineTuneModule, LinearProbeModule
from lightning_mim.convert import convert
from lightning_mim.export import create_model, to_timm
from lightning_mim.methods.teachers import load_mocov3_teacher
from lightning_mim.nn import sincos_2d_pos_embed

from .helpers import TINY_VIT_4X4, cpu_trainer, tiny_conmim, tiny_mimco

# A MoCo v3 ViT-S as facebookresearch/moco-v3 builds it (vits.py, moco/builder.py), at the tiny size:
# a timm ViT with MoCo v3's 12 heads whose `head` is the 3-layer projector, its momentum copy, and the
# 2-layer predictor, inside DDP's `module`.
SIZE: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2}
HIDDEN, OUT = 64, 16


def build_mlp(num_layers: int, in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear (no bias), BN, ReLU per hidden layer; the last BN not affine."""
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b, bias=False))
        layers += [nn.BatchNorm1d(b), nn.ReLU()] if i < num_layers - 1 else [nn.BatchNorm1d(b, affine=False)]
    return nn.Sequential(*layers)


class OfficialMoCoViT(nn.Module):
    def __init__(self, size: dict[str, Any], hidden: int, out: int) -> None:
        super().__init__()
        vit: Any = timm.create_model("vit_small_patch16_224", num_heads=12, num_classes=0, global_pool="token", **size)
        vit.head = build_mlp(3, size["embed_dim"], hidden, out)
        self.base_encoder: Any = vit
        self.momentum_encoder: Any = copy.deepcopy(vit)
        self.predictor = build_mlp(2, out, hidden, out)


def official_file(
    path: Path, arch: str = "vit_small", size: dict[str, Any] | None = None, hidden: int = HIDDEN, out: int = OUT
) -> OfficialMoCoViT:
    """Writes a MoCo v3 checkpoint as main_moco.py saves it; every tensor random (pos_embed, BN statistics).

    A ViT-S (12 heads) of ``size`` (default ``SIZE``) with a projector and predictor of ``hidden`` and ``out``.
    """
    torch.manual_seed(1)
    model = OfficialMoCoViT(size or SIZE, hidden, out)
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    wrapped = nn.Module()
    wrapped.module = model  # DDP's prefix
    optimizer = {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.1, "params": [0, 1]}]}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    checkpoint = {"epoch": 300, "arch": arch, "state_dict": wrapped.state_dict(), "optimizer": optimizer}
    torch.save({**checkpoint, "scaler": scaler}, path)
    return model.eval()


def test_every_part_of_the_official_file_computes_the_same(tmp_path: Path) -> None:
    official = official_file(tmp_path / "vit-s-300ep.pth.tar")
    out = convert(tmp_path / "vit-s-300ep.pth.tar", tmp_path / "converted.ckpt")
    teacher = load_mocov3_teacher(out)  # the converted file, as MimCo reads it
    direct = load_mocov3_teacher(tmp_path / "vit-s-300ep.pth.tar")  # the official file itself
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for module in (teacher, direct):
            pairs: list[tuple[Any, Any]] = [
                (module.encoder("student"), official.base_encoder),
                (module.encoder("teacher"), official.momentum_encoder),
            ]
            assert pairs[0][0].blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S, not timm's 6 heads
            for ours, source in pairs:
                features = source.forward_features(images)
                torch.testing.assert_close(ours.forward_features(images), features, atol=1e-6, rtol=0)
            cls = official.base_encoder.forward_features(images)[:, 0]
            torch.testing.assert_close(module.projector(cls), official.base_encoder.head(cls), atol=1e-6, rtol=0)
            query = official.base_encoder.head(cls)
            torch.testing.assert_close(module.predictor(query), official.predictor(query), atol=1e-6, rtol=0)
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["lightning_mim"]["converted_from"] == {
        "format": "mocov3",
        "file": "vit-s-300ep.pth.tar",
        "arch": "vit_small",
        "epoch": 300,
    }
    assert checkpoint["hyper_parameters"]["backbone"] == "vit_small_patch16_224"
    assert checkpoint["hyper_parameters"]["backbone_kwargs"] == SIZE  # read from the tensors
    assert (checkpoint["hyper_parameters"]["proj_hidden_dim"], checkpoint["hyper_parameters"]["proj_dim"]) == (64, 16)


def test_the_converted_checkpoint_exports_and_evaluates_the_base_encoder(tmp_path: Path) -> None:
    official = official_file(tmp_path / "official.pth.tar")
    converted = convert(tmp_path / "official.pth.tar", tmp_path / "converted.ckpt", format="mocov3")
    model: Any = create_model(to_timm(converted, tmp_path / "export"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = official.base_encoder.forward_features(images)
        torch.testing.assert_close(model.eval().forward_features(images), features, atol=1e-6, rtol=0)
        probe = cast(Any, LinearProbeModule(str(converted), num_classes=10, image_size=32).encoder)
        torch.testing.assert_close(probe.forward_features(images), features, atol=1e-6, rtol=0)
    # fine-tuning pools the mean with a new fc_norm (as the official fine-tuning): the rest is the file's
    tuned = FineTuneModule(str(converted), num_classes=10, image_size=32).model.state_dict()
    source = official.base_encoder.state_dict()
    shared = [k for k in source if not k.startswith(("head.", "norm."))]
    # left out: the projector (3 Linears, 2 BatchNorms of 5 tensors, the last BatchNorm's 3 buffers) and norm (2)
    assert len(shared) == len(source) - 18 and all(torch.equal(tuned[k], source[k]) for k in shared)


def test_mimco_trains_from_the_official_file_with_no_stage_1(tmp_path: Path) -> None:
    official = official_file(tmp_path / "vit-s-300ep.pth.tar")
    module = tiny_mimco(teacher_ckpt=str(tmp_path / "vit-s-300ep.pth.tar"), backbone_kwargs=TINY_VIT_4X4)
    expected = {k: v for k, v in official.base_encoder.state_dict().items() if not k.startswith("head.")}
    teacher = module.teacher.state_dict()
    assert teacher.keys() == expected.keys()
    assert all(torch.equal(teacher[k], v) for k, v in expected.items())  # the base encoder, as main_lincls.py
    assert module.teacher_projector is not None  # the file's projector gives the image-level target
    cls = torch.randn(3, SIZE["embed_dim"])
    with torch.no_grad():
        torch.testing.assert_close(module.teacher_projector(cls), official.base_encoder.head(cls), atol=1e-6, rtol=0)
    from lightning_mim.data import SampleDataModule

    cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, SampleDataModule(batch_size=8, train_size=16))
    assert all(torch.equal(module.teacher.state_dict()[k], v) for k, v in expected.items())  # frozen


def test_an_official_file_given_as_bare_timm_weights_says_to_use_teacher_ckpt(tmp_path: Path) -> None:
    official_file(tmp_path / "vit-s-300ep.pth.tar")
    with pytest.raises(ValueError, match=r"an official MoCo v3 checkpoint; pass it as teacher_ckpt"):
        tiny_mimco(
            teacher_arch="vit_small_patch16_224",
            teacher_weights=str(tmp_path / "vit-s-300ep.pth.tar"),
            teacher_kwargs=SIZE,
            backbone_kwargs=TINY_VIT_4X4,
        )


def test_files_of_another_kind_are_refused_saying_what_they_look_like(tmp_path: Path) -> None:
    official_file(tmp_path / "r50.pth.tar", arch="resnet50")
    with pytest.raises(ValueError, match=r"MoCo v3 arch 'resnet50'; lightning-mim converts the ViTs"):
        convert(tmp_path / "r50.pth.tar", tmp_path / "out.ckpt")
    ours = tmp_path / "conmim.ckpt"
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    from lightning_mim.data import SampleDataModule

    trainer.fit(tiny_conmim(), SampleDataModule(batch_size=8, train_size=16))
    trainer.save_checkpoint(ours)
    with pytest.raises(ValueError, match=r"not one of mocov3, mae, conmim, cmae; it looks like a lightning-mim conmim"):
        convert(ours, tmp_path / "out.ckpt")
    formats = "'mocov3', 'mae', 'conmim', 'cmae'"
    with pytest.raises(ValueError, match=rf"^convert\(format='beit'\): must be one of {formats}$"):
        convert(ours, tmp_path / "out.ckpt", format="beit")
    with pytest.raises(ValueError, match=r"not an official mae checkpoint; it looks like a lightning-mim conmim"):
        convert(ours, tmp_path / "out.ckpt", format="mae")
    assert not (tmp_path / "out.ckpt").exists()


def test_the_command_converts_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_mim.cli import main

    official_file(tmp_path / "vit-s-300ep.pth.tar")
    src, dst = str(tmp_path / "vit-s-300ep.pth.tar"), str(tmp_path / "mocov3_vits.ckpt")
    main(["convert", "mocov3", src, dst, "--export", str(tmp_path / "export")])
    printed = capsys.readouterr().out
    assert f"wrote {dst}" in printed and (tmp_path / "export" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "mocov3", dst, str(tmp_path / "again.ckpt")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "not an official mocov3 checkpoint; it looks like a lightning-mim mocov3 checkpoint" in error


# MAE's pre-training model (models_mae.py) at the tiny size: timm's ViT names for the encoder, then
# decoder_embed, mask_token, decoder_pos_embed (fixed sin-cos with a CLS row), decoder_blocks,
# decoder_norm, decoder_pred; saved with args, an argparse.Namespace, as util/misc.py's save_model does.
class OfficialMAE(nn.Module):
    def __init__(self, decoder_dim: int = 32) -> None:
        super().__init__()
        vit: Any = timm.create_model("vit_base_patch16_224", num_classes=0, global_pool="token", **SIZE)
        self.encoder = vit
        self.decoder_embed = nn.Linear(SIZE["embed_dim"], decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim))
        table = sincos_2d_pos_embed((4, 4), decoder_dim, cls_token=True)  # MAE's: columns in the first half
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        norm: Any = partial(nn.LayerNorm, eps=1e-6)
        # MAE's decoder has 16 heads at every size (decoder_num_heads=16)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, 16, 4.0, qkv_bias=True, norm_layer=norm)])
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, 8 * 8 * 3)

    def state(self, decoder: bool) -> dict[str, torch.Tensor]:
        encoder = {k: v for k, v in self.encoder.state_dict().items()}  # cls_token, pos_embed, blocks.N..., norm
        rest = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        return {**encoder, **rest} if decoder else encoder

    def decode_unmasked(self, tokens: torch.Tensor) -> torch.Tensor:
        """forward_decoder with nothing masked (ids_restore the identity): (B, N, p*p*3)."""
        x = self.decoder_embed(tokens) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def mae_file(path: Path, decoder: bool = True, args: Any = "namespace") -> OfficialMAE:
    torch.manual_seed(2)
    model = OfficialMAE()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name != "decoder_pos_embed":
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    namespace = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, input_size=32)
    checkpoint: dict[str, Any] = {"model": model.state(decoder), "epoch": 799, "scaler": {"scale": 1024.0}}
    if args is not None:
        checkpoint["args"] = namespace if args == "namespace" else args
    torch.save(checkpoint, path)
    return model.eval()


def test_mae_with_its_decoder_converts_to_an_mae_module_that_computes_the_same(tmp_path: Path) -> None:
    official = mae_file(tmp_path / "checkpoint-799.pth")
    out = convert(tmp_path / "checkpoint-799.pth", tmp_path / "mae.ckpt")
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["lightning_mim"]["method"] == "mae"
    assert checkpoint["lightning_mim"]["converted_from"] == {
        "format": "mae",
        "file": "checkpoint-799.pth",
        "arch": "mae_vit_base_patch16",
        "decoder": True,
        "epoch": 799,
    }
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["contrastive_weight"], hparams["decoder_dim"], hparams["decoder_depth"]) == (0.0, 32, 1)
    module = CMAEModule(**{k: v for k, v in hparams.items() if k != "optim"})
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = official.encoder.forward_features(images)
        ours = cast(Any, module.encoder()).forward_features(images)
        torch.testing.assert_close(ours, tokens, atol=1e-6, rtol=0)
        nothing_masked = torch.zeros(2, 16, dtype=torch.bool)
        decoded = module.pixel_decoder(tokens, nothing_masked)
        torch.testing.assert_close(decoded, official.decode_unmasked(tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(module.pixel_decoder.mask_token, official.mask_token)


def test_an_encoder_alone_converts_and_a_file_needs_a_known_mae_model(tmp_path: Path) -> None:
    official = mae_file(tmp_path / "encoder.pth", decoder=False)
    out = convert(tmp_path / "encoder.pth", tmp_path / "mae.ckpt", format="mae")
    assert torch.load(out, weights_only=True)["lightning_mim"]["converted_from"]["decoder"] is False
    model: Any = create_model(to_timm(out, tmp_path / "export"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().forward_features(images), official.encoder.forward_features(images), atol=1e-6, rtol=0
        )
    mae_file(tmp_path / "released.pth", decoder=False, args=None)  # as released: no args, width read instead
    with pytest.raises(ValueError, match=r"MAE model None \(encoder width 48\); lightning-mim converts"):
        convert(tmp_path / "released.pth", tmp_path / "x.ckpt")
    mae_file(tmp_path / "other.pth", args=datetime.date(2022, 1, 1))  # an object other than a Namespace
    with pytest.raises(ValueError, match=r"holds pickled Python objects other than tensors and plain types"):
        convert(tmp_path / "other.pth", tmp_path / "x.ckpt")


# ConMIM's pre-training model (modeling_pretrain.py) at the tiny size: a BEiT with a shared relative
# position bias (whose index is a persistent buffer there), no absolute position embedding, layer
# scale; mask_token, the unused lm_head and the projectors; saved with args as utils.save_model does.
class OfficialConMIM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        beit: Any = timm.create_model(
            "beit_base_patch16_224",
            num_heads=12,
            use_abs_pos_emb=False,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
            init_values=0.1,
            num_classes=0,
            global_pool="avg",
            use_fc_norm=False,
            **SIZE,
        )
        self.backbone = beit
        self.mask_token = nn.Parameter(torch.randn(1, 1, SIZE["embed_dim"]))
        self.lm_head = nn.Linear(SIZE["embed_dim"], 100)
        self.projectors = build_mlp(3, SIZE["embed_dim"], HIDDEN, OUT)

    def state(self) -> dict[str, torch.Tensor]:
        state = {**self.backbone.state_dict(), "mask_token": self.mask_token.detach()}
        state["rel_pos_bias.relative_position_index"] = self.backbone.rel_pos_bias.relative_position_index
        state.update({f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()})
        state.update({f"projectors.{k}": v for k, v in self.projectors.state_dict().items()})
        return state


def conmim_file(path: Path, seed: int) -> OfficialConMIM:
    torch.manual_seed(seed)
    model = OfficialConMIM()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_(torch.randn_like(tensor) * 0.1)
    args = argparse.Namespace(model="conmim_base_patch16_224", rel_pos_bias=True, abs_pos_emb=False)
    torch.save({"model": model.state(), "epoch": 799, "args": args}, path)
    return model.eval()


def test_conmim_student_and_teacher_files_fill_both_branches(tmp_path: Path) -> None:
    student = conmim_file(tmp_path / "checkpoint-799.pth", seed=3)
    teacher = conmim_file(tmp_path / "checkpoint_copy-799.pth", seed=4)
    src, copy_file = tmp_path / "checkpoint-799.pth", tmp_path / "checkpoint_copy-799.pth"
    out = convert(src, tmp_path / "conmim.ckpt", teacher=copy_file)
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["lightning_mim"]["converted_from"] == {
        "format": "conmim",
        "file": "checkpoint-799.pth",
        "arch": "conmim_base_patch16_224",
        "teacher": "checkpoint_copy-799.pth",
        "epoch": 799,
    }
    module = ConMIMModule(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k != "optim"})
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for which, source in (("student", student), ("teacher", teacher)):
            ours = cast(Any, module.encoder(cast(Any, which)))
            expected = source.backbone.forward_features(images)
            torch.testing.assert_close(ours.forward_features(images), expected, atol=1e-6, rtol=0)
        tokens = torch.randn(5, SIZE["embed_dim"])
        torch.testing.assert_close(module.student.projector(tokens), student.projectors(tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(module.teacher.projector(tokens), teacher.projectors(tokens), atol=1e-6, rtol=0)
    # the default export is the monitored encoder, the teacher: what the official fine-tuning starts from
    model: Any = create_model(to_timm(out, tmp_path / "export"))
    with torch.no_grad():
        exported = model.eval().forward_features(images)
        torch.testing.assert_close(exported, teacher.backbone.forward_features(images), atol=1e-6, rtol=0)


def test_one_conmim_file_fills_both_branches_and_a_teacher_needs_conmim(tmp_path: Path) -> None:
    official = conmim_file(tmp_path / "checkpoint_copy-799.pth", seed=5)
    out = convert(tmp_path / "checkpoint_copy-799.pth", tmp_path / "conmim.ckpt", format="conmim")
    state = torch.load(out, weights_only=True)["state_dict"]
    for key, value in official.backbone.state_dict().items():
        if not key.endswith("relative_position_index"):
            assert torch.equal(state[f"student.encoder.vit.{key}"], value)
            assert torch.equal(state[f"teacher.encoder.vit.{key}"], value)
    mae_file(tmp_path / "mae.pth")
    with pytest.raises(ValueError, match=r"a teacher file goes with a ConMIM student, not mae"):
        convert(tmp_path / "mae.pth", tmp_path / "x.ckpt", teacher=tmp_path / "checkpoint_copy-799.pth")


def test_moco_v3_weights_stripped_for_deit_need_moco_v3s_heads(tmp_path: Path) -> None:
    # convert_to_deit.py's file: a MoCo v3 ViT-S base encoder without its projector, as {"model": ...},
    # MoCo v3's fixed table kept; at ViT-S width (384, 12 heads of 32), one block, 32 px
    size: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 384, "depth": 1}
    torch.manual_seed(9)
    source: Any = timm.create_model("vit_small_patch16_224", num_heads=12, num_classes=0, global_pool="token", **size)
    with torch.no_grad():
        source.pos_embed.copy_(sincos_2d_pos_embed((4, 4), 384, order="rows_first"))
    torch.save({"model": source.state_dict()}, tmp_path / "vit-s-300ep-deit.pth")
    student = {**TINY_VIT_4X4, "embed_dim": 384, "num_heads": 12}
    teacher = {"teacher_arch": "vit_small_patch16_224", "image_target": "cls", "backbone_kwargs": student}
    with pytest.raises(
        ValueError, match=r"MoCo v3's fixed sin-cos table .* 12 attention heads; this architecture has 6"
    ):
        tiny_mimco(**teacher, teacher_weights=str(tmp_path / "vit-s-300ep-deit.pth"), teacher_kwargs=size)
    module = tiny_mimco(
        **teacher, teacher_weights=str(tmp_path / "vit-s-300ep-deit.pth"), teacher_kwargs={**size, "num_heads": 12}
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.eval().forward_features(images)
        torch.testing.assert_close(cast(Any, module.teacher).forward_features(images), expected, atol=1e-6, rtol=0)
    # a table of another layout (timm's learned one, MAE's) says nothing of the heads: timm's 6 load as asked
    with torch.no_grad():
        source.pos_embed.copy_(sincos_2d_pos_embed((4, 4), 384))  # columns first
    torch.save({"model": source.state_dict()}, tmp_path / "other.pth")
    other = tiny_mimco(**teacher, teacher_weights=str(tmp_path / "other.pth"), teacher_kwargs=size)
    assert cast(Any, other.teacher).blocks[0].attn.num_heads == 6


def test_an_official_file_where_ours_is_expected_names_the_convert_command(tmp_path: Path) -> None:
    official_file(tmp_path / "vit-s-300ep.pth.tar")
    src = tmp_path / "vit-s-300ep.pth.tar"
    command = (
        r"is an official mocov3 checkpoint, not a lightning-mim one; convert it first: lightning-mim convert mocov3 "
    )
    command += re.escape(str(src))
    with pytest.raises(ValueError, match=command):
        FineTuneModule(str(src), num_classes=10, image_size=32)
    with pytest.raises(ValueError, match=command):
        to_timm(src, tmp_path / "export")
    with pytest.raises(ValueError, match=command):
        tiny_conmim(weights=str(src))
    mae_file(tmp_path / "checkpoint-799.pth")  # its args Namespace stops the plain weights-only load first
    with pytest.raises(ValueError, match=r"argparse.Namespace.*official MAE and ConMIM checkpoints hold one"):
        LinearProbeModule(str(tmp_path / "checkpoint-799.pth"), num_classes=10, image_size=32)
