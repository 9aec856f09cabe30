"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` with errors that name the file and the cause."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "torch_load_weights", "unpickler_detail"]


def unpickler_detail(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in one line.

    "Unsupported global: GLOBAL os.system ..." (a pickled object) or "Unsupported operand 103" (a
    corrupt stream).
    """
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
        detail = unpickler_detail(err)
        if "weights only load failed" not in str(err).lower() or "GLOBAL" not in detail:
            raise ValueError(
                f"{path} is not a readable checkpoint (UnpicklingError: {detail}); is it a file written by "
                "torch.save / Lightning, complete and uncorrupted?"
            ) from err
        official = (
            " (official MAE and ConMIM checkpoints hold one: `lightning-mim convert` reads them)"
            if "argparse.Namespace" in detail
            else ""
        )
        raise ValueError(
            f"{path} is not a readable checkpoint: it holds pickled Python objects other than tensors and plain "
            f"types ({detail}){official}. lightning-mim loads with weights_only=True and never unpickles them, "
            "since that could run code from the file; re-save it with tensors and plain types"
        ) from err
    except Exception as err:  # corrupt, truncated or not written by torch.save: many exception types
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); is it a file written by "
            "torch.save / Lightning?"
        ) from err


def load_checkpoint(
    path: str | Path, what: str = "checkpoint", hint: str = "", official: bool = False
) -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True`` (pickled code is never run).

    Args:
        path: Checkpoint file.
        what: What the file is for, in error messages (e.g. "teacher checkpoint").
        hint: Appended to the not-found error (how to get the file).
        official: Return an official checkpoint (:func:`lightning_mim.convert.detect_format`) too; by
            default it is refused, naming the ``lightning-mim convert`` command that reads it.

    Raises:
        FileNotFoundError: No such file.
        ValueError: A directory, empty, unreadable (corrupt, or holding objects other than tensors and
            plain types), an official checkpoint not asked for, or not a Lightning checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    checkpoint = torch_load_weights(path)
    if isinstance(checkpoint, dict) and not official:
        from lightning_mim.convert import detect_format

        found = detect_format(checkpoint)
        if found is not None:
            raise ValueError(
                f"{what} {path} is an official {found} checkpoint, not a lightning-mim one; convert it first: "
                f"lightning-mim convert {found} {path} OUT.ckpt"
            )
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint
