"""Hand-off to timm: a pre-trained encoder as ``model.safetensors`` + ``config.json``.

Every method module names the encoders it can export (``export_encoders()``: ``"student"`` and, for
methods with an EMA teacher, ``"teacher"``) and records them in its checkpoints, so a checkpoint
alone is enough to export: no tokenizer, teacher checkpoint or method code is rebuilt. Only the timm
model is written; projectors, decoders, generators, tokenizers and mask tokens are left behind.

Example::

    lightning-mim export runs/conmim_vitb/checkpoints/last.ckpt exported/conmim_vitb

    import json, timm
    config = json.load(open("exported/conmim_vitb/config.json"))
    model = timm.create_model(
        config["architecture"], pretrained=True, num_classes=0,
        pretrained_cfg_overlay={"file": "exported/conmim_vitb/model.safetensors"}, **config["model_args"],
    )
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_mim.checkpoint.files import load_checkpoint
from lightning_mim.checkpoint.meta import EncoderSpec, encoder_meta, encoder_state, model_args

__all__ = ["EncoderSpec", "create_model", "encoder_meta", "encoder_state", "to_timm"]


def _write(
    out_dir: Path, arch: str, args: dict[str, Any], state: dict[str, torch.Tensor], info: dict[str, Any]
) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"architecture": arch, "model_args": args, **info}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def to_timm(source: str | Path | nn.Module, out_dir: str | Path, which: str | None = None) -> Path:
    """Exports a pre-trained encoder for timm: ``out_dir/model.safetensors`` and ``out_dir/config.json``.

    Args:
        source: A method checkpoint path, or a method module (ConMIM, CMAE/MAE, MoCo v3, MimCo, CIM).
        out_dir: Output folder (created).
        which: ``"student"`` or ``"teacher"``; None picks the method's recommended encoder (ConMIM: the
            teacher, as its official fine-tuning; the others: the student / online encoder / enhancer).

    Returns:
        ``out_dir``. Its ``config.json`` holds ``architecture`` and ``model_args`` for
        ``timm.create_model(architecture, pretrained=True, num_classes=0,
        pretrained_cfg_overlay={"file": ".../model.safetensors"}, **model_args)``.
    """
    out_dir = Path(out_dir).expanduser()
    if isinstance(source, nn.Module):
        if not hasattr(source, "export_encoders"):
            raise TypeError(f"{type(source).__name__} has no export_encoders(); pass a lightning-mim method module")
        specs: dict[str, EncoderSpec] = source.export_encoders()  # type: ignore[operator]
        which = which or getattr(source, "default_export", "student")
        if which not in specs:
            raise ValueError(f"{type(source).__name__} has no {which!r} encoder to export (it has: {sorted(specs)})")
        spec = specs[which]
        method = type(source).__name__
        return _write(
            out_dir, spec.arch, model_args(spec.kwargs), spec.module.state_dict(), {"method": method, "which": which}
        )
    path = Path(source).expanduser()
    checkpoint = load_checkpoint(path)
    which, arch, args, state = encoder_state(checkpoint, which)
    info = {"method": checkpoint["lightning_mim"]["method"], "which": which, "source": path.name}
    return _write(out_dir, arch, args, state, info)


def create_model(exported: str | Path, **overrides: Any) -> nn.Module:
    """The timm model of an export folder with its weights (``num_classes`` defaults to 0).

    ``overrides`` go to ``timm.create_model`` (e.g. ``num_classes=1000, drop_path_rate=0.1``); a new
    classifier head is initialised by timm.
    """
    import timm

    folder = Path(exported).expanduser()
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (needs config.json and model.safetensors)")
    config = json.loads(config_file.read_text())
    kwargs = {**config["model_args"], "num_classes": 0, **overrides}
    return timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs
    )
