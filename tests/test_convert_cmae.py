"""Official CMAE checkpoints (mmcv names): the released encoder and a whole model, converted and compared."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import Tensor, nn

from lightning_mim import CMAEModule
from lightning_mim.convert import convert
from lightning_mim.export import create_model, to_timm

# The official CMAE model (ZhichengHuang/CMAE: cmae_vit.py, vision_transformer.py, transformer_utils.py,
# necks/mae_neck.py, necks/nonlinear_neck.py, algorithms/cmae.py), written here from its structure with
# mmcv's module names, at arch 'b' widths (768, MLP 3072, 12 heads) but 2 layers, 64-px images, 16-px
# patches (a 4x4 grid: 16 * 16 * 3 = 768 pixels per patch, the width, as at ViT-B/16 224 px).
WIDTH, MLP, HEADS, DEPTH, PATCH, IMAGE = 768, 3072, 12, 2, 16, 64
GRID = IMAGE // PATCH
DECODER, DECODER_HEADS, HIDDEN, OUT = 32, 16, 64, 16


def cmae_sincos(grid: int, dim: int) -> Tensor:
    """CMAE's build_2d_sincos_position_embedding with its zero CLS row: torch.meshgrid's 'ij' indexing."""
    steps = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(steps, steps, indexing="ij")  # torch's default, which the official code uses
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class FFN(nn.Module):
    """mmcv's FFN with two fcs: layers = Sequential(Sequential(Linear, GELU, Dropout), Linear, Dropout)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        first = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0))
        self.layers = nn.Sequential(first, nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.layers(x))


class Layer(nn.Module):
    """TransformerEncoderLayer: pre-norm, ln1 -> attn, ln2 -> ffn, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.ln2, self.ffn = nn.LayerNorm(dim, eps=1e-6), FFN(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + cast(Tensor, self.ffn(self.ln2(x)))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, WIDTH, PATCH, PATCH)


class OfficialViT(nn.Module):
    """CMAEViT: cls_token, pos_embed (fixed), patch_embed.projection, layers.N, the final ln1 if final_norm."""

    def __init__(self, final_norm: bool = True) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(cmae_sincos(GRID, WIDTH), requires_grad=False)
        self.patch_embed = PatchEmbed()
        self.layers = nn.ModuleList([Layer(WIDTH, HEADS, MLP) for _ in range(DEPTH)])
        self.ln1 = nn.LayerNorm(WIDTH, eps=1e-6) if final_norm else None

    def forward(self, images: Tensor) -> Tensor:
        """Nothing masked (the target branch's mask_ratio 0): (B, 1 + N, D)."""
        x = self.patch_embed.projection(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.ln1(x) if self.ln1 is not None else x


class Decoder(nn.Module):
    """MAEPretrainDecoder: decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, ln1, decoder_pred."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(WIDTH, DECODER)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DECODER))
        self.decoder_pos_embed = nn.Parameter(cmae_sincos(GRID, DECODER), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Layer(DECODER, DECODER_HEADS, 4 * DECODER) for _ in range(depth)])
        self.ln1 = nn.LayerNorm(DECODER, eps=1e-6)
        self.decoder_pred = nn.Linear(DECODER, PATCH * PATCH * 3)

    def forward(self, tokens: Tensor) -> Tensor:
        """Nothing masked (ids_restore the identity): (B, N, p*p*3)."""
        x = self.decoder_embed(tokens) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return cast(Tensor, self.decoder_pred(self.ln1(x)))[:, 1:]


class Neck(nn.Module):
    """NonLinearNeck(num_layers=2, with_bias=True, with_last_bn=False): fc0, bn0 (eps 1e-6), ReLU, fc1 (no bias)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.fc0, self.bn0 = nn.Linear(in_dim, HIDDEN), nn.BatchNorm1d(HIDDEN, eps=1e-6)
        self.fc1 = nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.fc1(self.bn0(self.fc0(x)).relu()))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predictor = Neck(OUT)


class OfficialCMAE(nn.Module):
    """algorithms/cmae.py's module names: backbone, target_backbone (no final norm), two decoders, necks."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.target_backbone = OfficialViT(), OfficialViT(final_norm=False)
        self.pixel_decoder, self.feature_decoder = Decoder(3), Decoder(1)
        self.projector, self.target_projector, self.head = Neck(WIDTH), Neck(WIDTH), Head()


def randomised(model: OfficialCMAE, seed: int) -> OfficialCMAE:
    """Every learned tensor and BatchNorm statistic random; the fixed sin-cos tables kept."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "pos_embed" not in name:
                tensor.copy_(torch.randn_like(tensor) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def released_file(path: Path) -> OfficialCMAE:
    """As tools/extract_backbone_weights.py writes it: the online encoder, 'backbone.' stripped."""
    model = randomised(OfficialCMAE(), seed=6)
    torch.save({"state_dict": model.backbone.state_dict(), "author": "CMAE"}, path)
    return model


def whole_file(path: Path) -> OfficialCMAE:
    """The whole model's state dict, with the plain-typed parts of mmengine's meta."""
    model = randomised(OfficialCMAE(), seed=7)
    meta = {"epoch": 300, "iter": 375300, "mmengine_version": "0.10.0", "cfg": "model = dict(type='CMAE', ...)"}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)
    return model


def rebuilt(path: Path) -> tuple[CMAEModule, dict[str, Any]]:
    """The converted checkpoint loaded back into the module its hyper_parameters build."""
    checkpoint = torch.load(path, weights_only=True)
    module = CMAEModule(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k != "optim"})
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), checkpoint


def test_the_released_encoder_converts_and_computes_the_official_features(tmp_path: Path) -> None:
    official = released_file(tmp_path / "cmae_vit-base-p16_32xb128-coslr-300e_in1k.pth")
    out = convert(tmp_path / "cmae_vit-base-p16_32xb128-coslr-300e_in1k.pth", tmp_path / "cmae.ckpt")
    module, checkpoint = rebuilt(out)
    assert checkpoint["lightning_mim"]["method"] == "cmae"
    assert checkpoint["lightning_mim"]["converted_from"] == {
        "format": "cmae",
        "file": "cmae_vit-base-p16_32xb128-coslr-300e_in1k.pth",
        "arch": "b",
        "parts": "encoder",
    }
    hparams = checkpoint["hyper_parameters"]
    assert hparams["backbone"] == "vit_base_patch16_224"
    assert hparams["backbone_kwargs"] == {"depth": DEPTH, "img_size": IMAGE}  # read from the tensors
    assert hparams["pos_embed_order"] == "rows_first"  # the file's table, CMAE's
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        online = cast(Any, module.encoder("student"))
        assert online.blocks[0].attn.num_heads == HEADS
        torch.testing.assert_close(online.forward_features(images), official.backbone(images), atol=1e-6, rtol=0)
        # the target encoder starts as a copy without the final norm, as the official init_weights
        target = cast(Any, module.encoder("teacher")).forward_features(images)
        without_norm = OfficialViT(final_norm=False).eval()
        without_norm.load_state_dict({k: v for k, v in official.backbone.state_dict().items() if k[:4] != "ln1."})
        torch.testing.assert_close(target, without_norm(images), atol=1e-6, rtol=0)
        # the decoders, fresh, use the encoder's table layout
        assert module.pixel_decoder.pos_embed_order == "rows_first"
        torch.testing.assert_close(module.pixel_decoder.pos_embed, cmae_sincos(GRID, 512)[:, 1:])
        exported: Any = create_model(to_timm(out, tmp_path / "export"))
        exported_features = exported.eval().forward_features(images)
        torch.testing.assert_close(exported_features, official.backbone(images), atol=1e-6, rtol=0)


def test_a_whole_model_fills_every_part(tmp_path: Path) -> None:
    official = whole_file(tmp_path / "epoch_300.pth")
    out = convert(tmp_path / "epoch_300.pth", tmp_path / "cmae.ckpt", format="cmae")
    module, checkpoint = rebuilt(out)
    assert checkpoint["lightning_mim"]["converted_from"] == {
        "format": "cmae",
        "file": "epoch_300.pth",
        "arch": "b",
        "parts": "all",
        "epoch": 300,
    }
    hparams = checkpoint["hyper_parameters"]
    read = ("decoder_dim", "decoder_depth", "feature_decoder_depth", "proj_hidden_dim", "proj_dim")
    assert tuple(hparams[k] for k in read) == (DECODER, 3, 1, HIDDEN, OUT)
    images = torch.randn(3, 3, IMAGE, IMAGE)
    nothing_masked = torch.zeros(3, GRID * GRID, dtype=torch.bool)
    with torch.no_grad():
        tokens = official.backbone(images)
        torch.testing.assert_close(cast(Any, module.encoder()).forward_features(images), tokens, atol=1e-6, rtol=0)
        target = cast(Any, module.encoder("teacher")).forward_features(images)
        torch.testing.assert_close(target, official.target_backbone(images), atol=1e-6, rtol=0)
        pixels = module.pixel_decoder(tokens, nothing_masked)
        torch.testing.assert_close(pixels, official.pixel_decoder(tokens), atol=1e-6, rtol=0)
        features = module.online_heads.feature_decoder(tokens, nothing_masked)
        torch.testing.assert_close(features, official.feature_decoder(tokens), atol=1e-6, rtol=0)
        pooled = features.mean(dim=1)
        torch.testing.assert_close(module.online_heads.projector(pooled), official.projector(pooled), atol=1e-6, rtol=0)
        key = official.target_projector(pooled)
        torch.testing.assert_close(module.target_projector(pooled), key, atol=1e-6, rtol=0)
        torch.testing.assert_close(module.online_heads.predictor(key), official.head.predictor(key), atol=1e-6, rtol=0)


def test_other_cmae_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    official = randomised(OfficialCMAE(), seed=8)
    # a fine-tuned classifier: backbone with fc_norm, and head.head
    classifier = {f"backbone.{k}": v for k, v in official.backbone.state_dict().items()}
    classifier |= {"backbone.fc_norm.weight": torch.ones(WIDTH), "head.head.weight": torch.zeros(10, WIDTH)}
    torch.save({"meta": {"epoch": 100}, "state_dict": classifier}, tmp_path / "fine.pth")
    with pytest.raises(ValueError, match=r"a fine-tuned CMAE classifier .*converts the pre-training weights"):
        convert(tmp_path / "fine.pth", tmp_path / "x.ckpt")
    # layer scale (gamma_1) is not in CMAE's pre-training ViT
    state = {**official.backbone.state_dict(), "layers.0.gamma_1": torch.ones(WIDTH)}
    torch.save({"state_dict": state}, tmp_path / "scaled.pth")
    with pytest.raises(ValueError, match=r"the CMAE encoder key 'layers.0.gamma_1' has no place"):
        convert(tmp_path / "scaled.pth", tmp_path / "x.ckpt")
    # an mmengine training checkpoint pickles mmengine's log objects: refused, with the way out
    module = types.ModuleType("mmengine")  # a stand-in: mmengine.logging.history_buffer.HistoryBuffer

    class HistoryBuffer:
        pass

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        torch.save({"state_dict": {}, "message_hub": {"log_scalars": HistoryBuffer()}}, tmp_path / "epoch_1.pth")
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ValueError, match=r"mmengine training checkpoint .*tools/extract_backbone_weights\.py"):
        convert(tmp_path / "epoch_1.pth", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def mmcv_name(key: str) -> str:
    """A timm ViT key under CMAE's mmcv names (the reverse of the converter's mapping, written out here)."""
    key = key.replace("patch_embed.proj.", "patch_embed.projection.")
    if key.startswith("norm."):
        return "ln1." + key[len("norm.") :]
    if not key.startswith("blocks."):
        return key
    _, index, rest = key.split(".", 2)
    for timm_name, mmcv in (
        ("norm1.", "ln1."),
        ("norm2.", "ln2."),
        ("mlp.fc1.", "ffn.layers.0.0."),
        ("mlp.fc2.", "ffn.layers.1."),
    ):
        rest = mmcv + rest[len(timm_name) :] if rest.startswith(timm_name) else rest
    return f"layers.{index}.{rest}"


@pytest.mark.slow  # three ViT-B models: about 40 s
def test_the_readme_commands_take_a_converted_cmae_release(tmp_path: Path) -> None:
    from lightning_mim.cli import LightningMIMCLI

    source = CMAEModule(decoder_depth=1, feature_decoder_depth=1).online_encoder.vit  # ViT-B/16, 224 px
    state = {mmcv_name(k): v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "author": "CMAE"}, tmp_path / "cmae_vit-base-p16_32xb128-coslr-1600e_in1k.pth")
    converted = convert(tmp_path / "cmae_vit-base-p16_32xb128-coslr-1600e_in1k.pth", tmp_path / "cmae_vitb.ckpt")
    root = Path(__file__).resolve().parents[1]
    for config in ("cmae_vitb.yaml", "finetune_vitb.yaml"):  # continue pre-training; fine-tune
        args = ["--config", str(root / "configs" / config), "--data.root", str(tmp_path), "--trainer.logger", "false"]
        cli = LightningMIMCLI(args=[*args, "--model.weights", str(converted)], run=False)
        encoder = cast(Any, cli.model).online_encoder.vit if config == "cmae_vitb.yaml" else cast(Any, cli.model).model
        loaded = encoder.state_dict()
        shared = [k for k in source.state_dict() if k in loaded and not k.startswith("norm.")]
        assert len(shared) == 4 + 12 * 12  # tokens, table, patch embedding; 12 blocks of 12 tensors
        assert all(torch.equal(loaded[k], source.state_dict()[k]) for k in shared)
