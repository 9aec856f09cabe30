"""Continuing pre-training from official weights: the methods' ``weights`` argument."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mim import CMAEModule, MoCoV3Module
from lightning_mim.convert import convert
from lightning_mim.data import SampleDataModule

from .helpers import cpu_trainer, tiny_conmim
from .test_convert import SIZE, mae_file, official_file


def fitted_steps(module: Any, steps: int, root: Path) -> Any:
    trainer = cpu_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=root)
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=16))
    return trainer


def test_mocov3_continues_from_the_official_weights_with_a_new_optimizer(tmp_path: Path) -> None:
    official_file(tmp_path / "vit-s-300ep.pth.tar")
    converted = convert(tmp_path / "vit-s-300ep.pth.tar", tmp_path / "mocov3.ckpt")
    start = torch.load(converted, weights_only=True)["state_dict"]
    kwargs: dict[str, Any] = {"backbone": "vit_small_patch16_224", "proj_hidden_dim": 64, "proj_dim": 16}
    module = MoCoV3Module(backbone_kwargs=SIZE, weights=str(converted), **kwargs)
    assert module.state_dict().keys() == start.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in start.items())
    assert "weights" not in module.hparams  # rebuilding from our checkpoints never reads the file again
    trainer = fitted_steps(module, 2, tmp_path)
    assert trainer.global_step == 2  # the step count, the schedule and AdamW's moments start anew
    assert int(trainer.optimizers[0].state[next(iter(module.base.parameters()))]["step"]) == 2
    moved = module.state_dict()["base.encoder.blocks.0.attn.qkv.weight"]
    assert not torch.equal(moved, start["base.encoder.blocks.0.attn.qkv.weight"])
    trainer.save_checkpoint(tmp_path / "continued.ckpt")
    checkpoint = torch.load(tmp_path / "continued.ckpt", weights_only=True)
    assert checkpoint["lightning_mim"]["started_from"] == str(converted)
    MoCoV3Module.load_from_checkpoint(tmp_path / "continued.ckpt", weights_only=True)  # needs no weights file


def test_weights_of_another_architecture_or_method_are_refused(tmp_path: Path) -> None:
    official_file(tmp_path / "vit-s-300ep.pth.tar")
    converted = str(convert(tmp_path / "vit-s-300ep.pth.tar", tmp_path / "mocov3.ckpt"))
    kwargs: dict[str, Any] = {"backbone": "vit_small_patch16_224", "proj_hidden_dim": 64, "proj_dim": 16}
    # timm's 6 heads: the same tensors, another model
    with pytest.raises(ValueError, match=r"its student encoder is vit_small_patch16_224\(.*'num_heads': 12.*\), this"):
        MoCoV3Module(backbone_kwargs={**SIZE, "num_heads": 6}, weights=converted, **kwargs)
    with pytest.raises(ValueError, match=r"weights do not fit this module: .*size mismatch"):
        MoCoV3Module(backbone_kwargs=SIZE, weights=converted, **{**kwargs, "proj_dim": 32})
    with pytest.raises(ValueError, match=r"not a ConMIM checkpoint \(found: mocov3\)"):
        tiny_conmim(weights=converted)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found"):
        tiny_conmim(weights=str(tmp_path / "missing.ckpt"))


def test_mae_continues_from_the_released_encoder_with_a_fresh_decoder(tmp_path: Path) -> None:
    official = mae_file(tmp_path / "mae_pretrain_vit_base.pth", decoder=False)
    converted = convert(tmp_path / "mae_pretrain_vit_base.pth", tmp_path / "mae.ckpt")
    hparams = torch.load(converted, weights_only=True)["hyper_parameters"]
    module = CMAEModule(**{k: v for k, v in hparams.items() if k != "optim"}, weights=str(converted))
    encoder = module.online_encoder.vit.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in official.encoder.state_dict().items())
    fitted_steps(module, 2, tmp_path)  # the first step's learning rate is 0 (warm-up)
    qkv = module.online_encoder.vit.state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.equal(qkv, official.encoder.state_dict()["blocks.0.attn.qkv.weight"])
