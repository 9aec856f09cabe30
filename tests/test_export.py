"""Export to timm: every method's encoder round-trips through model.safetensors + config.json."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from lightning_mim.data import SampleDataModule
from lightning_mim.data.views import normalize
from lightning_mim.export import create_model, to_timm

from .helpers import (
    TINY_VIT_8X8,
    PretrainingModule,
    cpu_trainer,
    forward_features,
    tiny_cim,
    tiny_cim_resnet50,
    tiny_cmae,
    tiny_conmim,
    tiny_mimco,
    tiny_mocov3,
)

# Each method's tiny module, with the narrow heads (and, for MoCo v3 and MimCo, the 8x8 grid) of these tests.
MODULES: dict[str, Callable[[], PretrainingModule]] = {
    "conmim": lambda: tiny_conmim(proj_hidden_dim=32, proj_dim=16),
    "cmae": lambda: tiny_cmae(decoder_dim=16, proj_hidden_dim=1536, proj_dim=256),  # CMAE's default projector
    "mocov3": lambda: tiny_mocov3(backbone_kwargs=TINY_VIT_8X8, proj_hidden_dim=32),
    "mimco": lambda: tiny_mimco(backbone_kwargs=TINY_VIT_8X8, proj_hidden_dim=32),
    "cim_vit": tiny_cim,
    "cim_resnet50": tiny_cim_resnet50,
}


def encoder_features(module: PretrainingModule, which: str, images: torch.Tensor) -> torch.Tensor:
    encoder = module.export_encoders()[which].module.eval()
    with torch.no_grad():
        return forward_features(encoder, images)


@pytest.mark.parametrize("method", list(MODULES))
def test_checkpoint_export_loads_in_timm_with_the_same_features(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MODULES[method]()
    size = 64 if method == "cim_resnet50" else 32
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    images = torch.randn(2, 3, size, size)
    for which in module.export_encoders():
        out = to_timm(ckpt, tmp_path / which, which=which)
        config = json.loads((out / "config.json").read_text())
        assert config["which"] == which and "num_classes" not in config["model_args"]
        model = timm.create_model(
            config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay={"file": str(out / "model.safetensors")},
            num_classes=0,
            **config["model_args"],
        ).eval()
        from safetensors.torch import load_file

        exported = load_file(str(out / "model.safetensors"))
        missing, unexpected = model.load_state_dict(exported, strict=False)
        assert not missing and not unexpected  # the file is exactly the timm encoder
        assert not any(k.startswith(("generator", "tokenizer", "projector", "decoder", "mask_token")) for k in exported)
        with torch.no_grad():
            timm_features = forward_features(model, images)
        assert torch.allclose(timm_features, encoder_features(module, which, images), atol=1e-5)
    # What training monitors (kNN on `embed`) is what the default export gives in timm, pooling included.
    default = to_timm(ckpt, tmp_path / "default")
    assert json.loads((default / "config.json").read_text())["which"] == module.default_export
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    module.eval()
    with torch.no_grad():
        timm_pooled = create_model(default).eval()(normalize(pixels, module.mean, module.std))
        monitored = module.embed(pixels)
    assert timm_pooled.shape == monitored.shape
    assert torch.allclose(timm_pooled, monitored, atol=1e-5), (timm_pooled - monitored).abs().max()


def test_export_from_a_module_and_create_model(tmp_path: Path) -> None:
    module = MODULES["conmim"]()
    assert set(module.export_encoders()) == {"student", "teacher"}
    out = to_timm(module, tmp_path / "conmim")  # default: the teacher, as the official fine-tuning
    assert json.loads((out / "config.json").read_text())["which"] == "teacher"
    model = create_model(out).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(forward_features(model, images), encoder_features(module, "teacher", images), atol=1e-5)
    classifier = create_model(out, num_classes=10, drop_path_rate=0.1)
    assert classifier.num_classes == 10


def test_bad_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        to_timm(tmp_path / "missing.ckpt", tmp_path / "out")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        to_timm(tmp_path / "junk.ckpt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a lightning-mim checkpoint"):
        to_timm(tmp_path / "plain.ckpt", tmp_path / "out")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "lightning_mim": {"method": "cmae"}}, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="older lightning-mim"):
        to_timm(tmp_path / "old.ckpt", tmp_path / "out")
    with pytest.raises(ValueError, match="no 'teacher' encoder"):
        to_timm(MODULES["cmae"](), tmp_path / "out", which="teacher")
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        create_model(tmp_path)


def test_export_command(tmp_path: Path) -> None:
    module = MODULES["cim_vit"]()
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4))
    trainer.save_checkpoint(tmp_path / "cim.ckpt")
    cmd = [sys.executable, "-m", "lightning_mim", "export", str(tmp_path / "cim.ckpt"), str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out/model.safetensors").is_file() and "timm.create_model" in result.stdout
    bad = subprocess.run([*cmd[:4], str(tmp_path / "nope.ckpt"), str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode != 0 and "checkpoint not found" in bad.stderr
