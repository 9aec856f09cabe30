"""Checkpoint I/O that never leaves a half-written checkpoint and never unpickles code unasked."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import TorchCheckpointIO
from typing_extensions import override

from lightning_mim.checkpoint.files import unpickler_detail

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with same-folder atomic writes and ``weights_only`` loading.

    Lightning writes a local checkpoint to a temporary file from ``tempfile.mkstemp`` (the system's
    temporary folder) and moves it into place. When that folder is on another file system than the
    checkpoints — the usual case on clusters (node-local ``/tmp``, shared checkpoint storage) — the
    move is a copy, and a crash during it leaves a truncated ``last.ckpt`` where the good one was.
    This plugin writes ``.<name>.tmp-<pid>`` beside the target, flushes it to disk and renames it over
    the target (``os.replace``, atomic within a file system), so a crash at any moment leaves either
    the old or the new checkpoint. Remote paths (``s3://`` ...) go through Lightning's writer (object
    stores replace whole objects).

    Loading uses ``torch.load(weights_only=True)`` unless the caller passes ``weights_only=False``
    explicitly (``trainer.fit(..., weights_only=False)``): Lightning would otherwise unpickle
    checkpoints fetched over http(s) without restriction. lightning-mim checkpoints hold only
    tensors and plain Python values, so they always load this way.

    Failures name the file and the cause: a checkpoint that cannot be written (a full disk, say) is
    reported with its path and the free space, the previous checkpoint of that name left in place; one
    that cannot be read (truncated by an interrupted copy, corrupt) raises a ``ValueError`` saying so.

    ``lightning-mim fit`` uses it by default. With a plain Trainer::

        trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except (OSError, RuntimeError) as err:  # torch.save reports a short write as "unexpected pos ..."
            written = partial.stat().st_size if partial.exists() else 0
            partial.unlink(missing_ok=True)
            raise _write_error(target, written, err) from err
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location, weights_only=weights_only is not False)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as err:
            detail = unpickler_detail(err)  # what torch refused, in one line
            if "GLOBAL" in detail:  # refused, not run
                raise ValueError(
                    f"checkpoint {path} holds pickled Python objects other than tensors and plain types "
                    f"({detail}); it is loaded with weights_only=True, which never unpickles them since that "
                    "could run code from the file"
                ) from err
            raise ValueError(
                f"checkpoint {path} cannot be read (UnpicklingError: {detail}): the file is truncated or corrupt"
            ) from err
        except Exception as err:  # torch raises RuntimeError, EOFError... for a truncated or foreign file
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {detail}): the file is truncated or "
                "corrupt (a copy or a write that did not finish?), or not a checkpoint"
            ) from err


def _write_error(target: Path, written: int, err: BaseException) -> OSError:
    """The error of a failed checkpoint write: the file, the cause, and that the previous one is kept."""
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = -1
    full = getattr(err, "errno", None) == errno.ENOSPC or 0 <= free < 2**20  # under 1 MiB left
    kept = f"; the previous {target.name} is unchanged" if target.exists() else ""
    if full:
        cause = f"the disk is full ({free / 2**20:.1f} MiB free in {target.parent} after {written / 2**20:.1f} MiB)"
        return OSError(errno.ENOSPC, f"could not write checkpoint {target}: {cause}{kept}")
    return OSError(getattr(err, "errno", None) or errno.EIO, f"could not write checkpoint {target}: {err}{kept}")


def _fsync_folder(folder: Path) -> None:
    """Makes the rename durable (the folder entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
