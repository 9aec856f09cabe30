"""The lightning-mim entry of method checkpoints: which method wrote it, and its random-stream state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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


def load_checkpoint(path: str | Path, what: str = "checkpoint", hint: str = "") -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True`` (pickled code is never run).

    Args:
        path: Checkpoint file.
        what: What the file is for, in error messages (e.g. "teacher checkpoint").
        hint: Appended to the not-found error (how to get the file).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unreadable (corrupt, or holding objects other than tensors and plain types), or
            not a Lightning checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint
