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


def write_meta(checkpoint: dict[str, Any], method: str, **state: Any) -> None:
    """Records ``method`` (and any plain-typed ``state``) in a checkpoint being saved."""
    checkpoint[_KEY] = {"method": method, **state}


def read_meta(checkpoint: dict[str, Any], method: str) -> dict[str, Any]:
    """The lightning-mim entry of a checkpoint being loaded; a clear error if another method wrote it."""
    meta = checkpoint.get(_KEY)
    if meta is None or meta.get("method") != method:
        found = meta.get("method") if meta else "no lightning-mim metadata"
        raise ValueError(f"not a {_NAMES.get(method, method)} checkpoint (found: {found})")
    return meta
