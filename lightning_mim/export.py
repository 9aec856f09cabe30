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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_mim.methods._checkpoint import load_checkpoint

__all__ = ["EncoderSpec", "create_model", "encoder_meta", "encoder_state", "to_timm"]

#: timm arguments that change training (regularisation), not the architecture or its weights: not
#: written to config.json, so users set their own when fine-tuning.
_TRAINING_ONLY = {"drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate"}
_NOT_ARGS = {"num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay"}
#: Methods whose checkpoints hold no timm encoder (CIM's stage-0 tokenizer is a VQ-VAE).
_NO_ENCODER = {"vq_tokenizer": "VQ tokenizer (CIM stage 0)"}


@dataclass(frozen=True)
class EncoderSpec:
    """An exportable encoder: a timm model and the ``timm.create_model`` call that rebuilds it."""

    arch: str
    kwargs: dict[str, Any]
    module: nn.Module


def _plain(value: Any) -> Any:
    """JSON-friendly copy: tuples become lists; anything else must already be plain."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"timm argument value {value!r} cannot be exported to config.json")


def model_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments worth writing: architecture, not regularisation."""
    return {k: _plain(v) for k, v in kwargs.items() if k not in _TRAINING_ONLY | _NOT_ARGS}


def encoder_meta(module: nn.Module) -> dict[str, Any]:
    """The export entry of a method checkpoint: per encoder, its state-dict prefix, arch and args."""
    specs: dict[str, EncoderSpec] = module.export_encoders()  # type: ignore[operator]
    names = {id(m): name for name, m in module.named_modules()}
    entry: dict[str, Any] = {}
    for which, spec in specs.items():
        name = names.get(id(spec.module))
        if name is None:
            raise ValueError(f"the {which} encoder is not a submodule of {type(module).__name__}")
        entry[which] = {"prefix": f"{name}." if name else "", "arch": spec.arch, "model_args": model_args(spec.kwargs)}
    return {"encoders": entry, "default_export": getattr(module, "default_export", "student")}


def encoder_state(
    checkpoint: dict[str, Any], which: str | None = None
) -> tuple[str, str, dict[str, Any], dict[str, torch.Tensor]]:
    """(which, arch, model_args, encoder state dict) of a lightning-mim checkpoint.

    Args:
        checkpoint: A loaded checkpoint (``torch.load(..., weights_only=True)``).
        which: ``"student"``, ``"teacher"``, or None for the method's recommended encoder.
    """
    meta = checkpoint.get("lightning_mim")
    if not isinstance(meta, dict) or "method" not in meta:
        raise ValueError("not a lightning-mim checkpoint (no lightning_mim entry)")
    if str(meta["method"]) in _NO_ENCODER:
        raise ValueError(
            f"a {_NO_ENCODER[str(meta['method'])]} checkpoint holds no encoder to export or fine-tune; pass the "
            "checkpoint of a pre-training method (ConMIM, MimCo, CMAE/MAE, CIM, MoCo v3)"
        )
    if not isinstance(meta.get("encoders"), dict):
        raise ValueError(
            f"this {meta['method']} checkpoint was written by an older lightning-mim without export "
            "information; load it into its module (Module.load_from_checkpoint) and export with "
            "lightning_mim.export.to_timm(module, out_dir)"
        )
    which = which or meta.get("default_export", "student")
    encoders = meta["encoders"]
    if which not in encoders:
        raise ValueError(
            f"a {meta['method']} checkpoint has no {which!r} encoder to export (it has: {sorted(encoders)})"
        )
    entry = encoders[which]
    prefix = entry["prefix"]
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"the checkpoint holds no weights under {prefix!r}")
    return which, entry["arch"], dict(entry["model_args"]), state


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
