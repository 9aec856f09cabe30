"""The lightning-mim entry of method checkpoints: which method wrote it, and its random-stream state."""

from __future__ import annotations

from typing import Any

_KEY = "lightning_mim"
_NAMES = {
    "conmim": "ConMIM",
    "cmae": "CMAE",
    "mae": "MAE",
    "mocov3": "MoCo v3",
    "mimco": "MimCo",
    "vq_tokenizer": "VQ tokenizer",
    "cim": "CIM",
}


def write_meta(checkpoint: dict[str, Any], method: str, module: Any = None, **state: Any) -> None:
    """Records ``method`` (and any plain-typed ``state``) in a checkpoint being saved.

    With ``module`` (a method module with ``export_encoders()``), also records which timm encoders
    the checkpoint holds, so that :func:`lightning_mim.export.to_timm` needs nothing else.
    """
    checkpoint[_KEY] = {"method": method, **state}
    if module is not None:
        from lightning_mim.export import encoder_meta

        checkpoint[_KEY].update(encoder_meta(module))


def read_meta(checkpoint: dict[str, Any], method: str) -> dict[str, Any]:
    """The lightning-mim entry of a checkpoint being loaded; a clear error if another method wrote it."""
    meta = checkpoint.get(_KEY)
    if meta is None or meta.get("method") != method:
        found = meta.get("method") if meta else "no lightning-mim metadata"
        raise ValueError(f"not a {_NAMES.get(method, method)} checkpoint (found: {found})")
    return meta
