"""The lightning-mim entry of method checkpoints: which method wrote it, and its random-stream state."""

from __future__ import annotations

import pickle
import re
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
    from lightning_mim import __version__

    checkpoint[_KEY] = {"method": method, "version": __version__, **state}
    if module is not None:
        from lightning_mim.export import encoder_meta

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


def _unpickler_detail(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused: "Unsupported global: GLOBAL os.system ..." (a pickled
    object) or "Unsupported operand 103" (a corrupt stream)."""
    if err.__context__ is not None:
        return str(err.__context__).partition(". ")[0]
    match = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\.|\n|$)", str(err))
    return match.group(1).strip() if match else str(err).partition("\n")[0]


def torch_load_weights(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain types only, pickled code is never run.

    Raises:
        ValueError: The file is empty, a directory, holds other pickled objects (refused, not run),
            or is not something ``torch.save`` wrote; the message says which.
    """
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is not a readable checkpoint: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "weights only load failed" not in str(err).lower() or "GLOBAL" not in detail:
            raise ValueError(
                f"{path} is not a readable checkpoint (UnpicklingError: {detail}); is it a file written by "
                "torch.save / Lightning, complete and uncorrupted?"
            ) from err
        raise ValueError(
            f"{path} is not a readable checkpoint: it holds pickled Python objects other than tensors and plain "
            f"types ({detail}). lightning-mim loads with weights_only=True and never unpickles them, since that "
            "could run code from the file; re-save it with tensors and plain types"
        ) from err
    except Exception as err:  # corrupt, truncated or not written by torch.save: many exception types
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); is it a file written by "
            "torch.save / Lightning?"
        ) from err


def load_checkpoint(path: str | Path, what: str = "checkpoint", hint: str = "") -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True`` (pickled code is never run).

    Args:
        path: Checkpoint file.
        what: What the file is for, in error messages (e.g. "teacher checkpoint").
        hint: Appended to the not-found error (how to get the file).

    Raises:
        FileNotFoundError: No such file.
        ValueError: A directory, empty, unreadable (corrupt, or holding objects other than tensors and
            plain types), or not a Lightning checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    checkpoint = torch_load_weights(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint
