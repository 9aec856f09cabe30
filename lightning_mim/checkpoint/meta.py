"""What a lightning-mim checkpoint records besides weights.

The method that wrote it, its random-stream state, and the timm encoders it holds (so that exporting
or fine-tuning needs nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["EncoderSpec", "encoder_meta", "encoder_state", "model_args", "read_meta", "write_meta"]

_KEY = "lightning_mim"
_NAMES = {
    "conmim": "ConMIM",
    "cmae": "CMAE",
    "mae": "MAE",
    "mocov3": "MoCo v3",
    "mimco": "MimCo",
    "vq_tokenizer": "VQ tokenizer",
    "cim": "CIM",
    "finetune": "fine-tuning",
    "linear_probe": "linear probe",
}


def write_meta(checkpoint: dict[str, Any], method: str, module: Any = None, **state: Any) -> None:
    """Records ``method`` (and any plain-typed ``state``) in a checkpoint being saved.

    With ``module`` (a method module with ``export_encoders()``), also records which timm encoders
    the checkpoint holds, so that :func:`lightning_mim.export.to_timm` needs nothing else.
    """
    from lightning_mim import __version__

    checkpoint[_KEY] = {"method": method, "version": __version__, **state}
    if module is not None:
        checkpoint[_KEY].update(encoder_meta(module))


class _Meta(dict[str, Any]):
    """A checkpoint's lightning-mim entry: reading an entry it lacks (an older format) is a clear error."""

    def __init__(self, entry: dict[str, Any], name: str) -> None:
        super().__init__(entry)
        self.name = name

    def __missing__(self, key: str) -> Any:
        raise ValueError(
            f"this {self.name} checkpoint has no {key!r} entry: it was written by an older lightning-mim. Its "
            "weights still load (module.load_state_dict(torch.load(path, weights_only=True)['state_dict'])), "
            "but training cannot resume from it"
        )


def read_meta(checkpoint: dict[str, Any], method: str) -> dict[str, Any]:
    """The lightning-mim entry of a checkpoint being loaded.

    Raises:
        ValueError: Another method wrote the checkpoint, or it has no lightning-mim entry (another
            program, or an older format); the message names the method wanted and the one found.
            Reading an entry that the returned dict lacks (an older format) raises one too.
    """
    name = _NAMES.get(method, method)
    meta = checkpoint.get(_KEY)
    if not isinstance(meta, dict):
        raise ValueError(
            f"not a {name} checkpoint (found: no lightning-mim metadata): it was not saved by a lightning-mim "
            f"{name} module (another program, or a lightning-mim older than checkpoint metadata)"
        )
    found = meta.get("method")
    if found != method:
        raise ValueError(
            f"not a {name} checkpoint (found: {found}): it was saved by the {_NAMES.get(str(found), found)} module; "
            f"a {name} module cannot load or resume from it"
        )
    return _Meta(meta, name)


#: timm arguments that change training (regularisation), not the architecture or its weights: not
#: written to config.json, so users set their own when fine-tuning.
_TRAINING_ONLY = {"drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate"}
_NOT_ARGS = {"num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay"}
#: Methods whose checkpoints hold no timm encoder (CIM's stage-0 tokenizer is a VQ-VAE).
_NO_ENCODER = {
    "vq_tokenizer": "VQ tokenizer (CIM stage 0)",
    "finetune": "fine-tuning (FineTuneModule)",
    "linear_probe": "linear probe (LinearProbeModule)",
}


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
    meta = checkpoint.get(_KEY)
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
