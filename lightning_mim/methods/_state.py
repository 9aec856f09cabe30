"""What a method module keeps in its checkpoints and hparams, written and read the same way by all.

The optimiser settings recorded in hparams as plain types (so checkpoints load with
``weights_only=True``) and restored on resume, and the lightning-mim checkpoint entry: the method's
name, its encoders and the state of its random streams.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning.pytorch as pl

from lightning_mim.checkpoint.files import load_checkpoint
from lightning_mim.checkpoint.meta import encoder_meta, read_meta, write_meta
from lightning_mim.optim import OptimConfig, optim_config, resumable_optim

__all__ = [
    "load_method_state",
    "load_start_weights",
    "record_hparams",
    "rename_state_prefix",
    "restore_optim",
    "save_method_state",
    "store_optim",
]


def record_hparams(
    module: pl.LightningModule, optim: OptimConfig | Mapping[str, Any], ignore: Sequence[str] = ()
) -> OptimConfig:
    """Records the arguments of the calling ``__init__`` as hparams; returns ``optim`` as an :class:`OptimConfig`.

    Lightning's ``save_hyperparameters`` on the caller's frame, leaving out ``ignore`` (objects such as a
    mask generator) and ``optim``, which :func:`store_optim` then records as plain types. Call it
    right after ``super().__init__()``.
    """
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    module.save_hyperparameters(ignore=[*ignore, "optim"], frame=caller)
    return store_optim(module, optim)


def store_optim(module: pl.LightningModule, optim: OptimConfig | Mapping[str, Any]) -> OptimConfig:
    """``optim`` as an :class:`OptimConfig`, recorded in ``module.hparams["optim"]`` as plain types.

    Plain types keep checkpoints loadable with ``weights_only=True``; :func:`record_hparams` calls it after
    ``save_hyperparameters(ignore=[..., "optim"])``.
    """
    config = optim_config(optim)
    module.hparams["optim"] = dataclasses.asdict(config)
    return config


def restore_optim(module: pl.LightningModule, config: OptimConfig, checkpoint: dict[str, Any]) -> OptimConfig:
    """The optimiser settings a resumed run continues with, recorded in ``module.hparams["optim"]``.

    See :func:`~lightning_mim.optim.resumable_optim`.
    """
    return store_optim(module, resumable_optim(config, checkpoint, type(module).__name__))


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def load_start_weights(module: pl.LightningModule, weights: str | None, method: str) -> None:
    """Starts ``module`` from the weights of a checkpoint of the same method: its ``weights`` argument.

    Weights only: the optimiser, the schedule and the step count start anew (a resume, ``ckpt_path``,
    then replaces them all). The checkpoint is a lightning-mim one of ``method``, a converted official
    one included (``lightning-mim convert``); its encoders must have been built with the same timm
    arguments as ``module``'s (heads included, which weight shapes cannot tell), and every tensor must
    have its place. Call it last in ``__init__``; the path goes to the checkpoint's ``started_from``.
    """
    if weights is None:
        return
    owner = f"{type(module).__name__}(weights={weights!r})"
    checkpoint = load_checkpoint(weights, f"{owner}: checkpoint")
    try:
        meta = read_meta(checkpoint, method)
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from err
    if hasattr(module, "export_encoders") and isinstance(meta.get("encoders"), dict):
        ours = encoder_meta(module)["encoders"]
        for which, entry in meta["encoders"].items():
            built = ours.get(which)
            if built is None:
                continue
            written, have = _with_heads(entry), _with_heads(built)
            if written != have:
                raise ValueError(
                    f"{owner}: its {which} encoder is {written[0]}({written[1]}), this module builds "
                    f"{have[0]}({have[1]}); build the module with the checkpoint's backbone and backbone_kwargs "
                    "(its hyper_parameters)"
                )
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(f"{owner}: its weights do not fit this module: {detail}") from err
    module._started_from = str(weights)  # type: ignore[assignment]


def _with_heads(entry: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """An encoder entry's (arch, timm arguments) with its heads made explicit (timm's default when unset)."""
    from lightning_mim.methods.teachers import timm_heads

    arch, args = str(entry["arch"]), dict(entry["model_args"])
    return arch, {**args, "num_heads": timm_heads(arch, args)}


def save_method_state(
    checkpoint: dict[str, Any],
    method: str,
    module: Any = None,
    streams: Mapping[str, _Stateful] | None = None,
    **entries: Any,
) -> None:
    """Writes the lightning-mim entry of a checkpoint being saved.

    The method, its encoders (with a ``module`` that has ``export_encoders()``), its random streams and
    any further plain-typed ``entries``.
    """
    states = {name: stream.state_dict() for name, stream in (streams or {}).items()}
    started = getattr(module, "_started_from", None)
    if started is not None:  # the weights it started from (load_start_weights)
        entries = {"started_from": started, **entries}
    write_meta(checkpoint, method, module=module, **states, **entries)


def rename_state_prefix(state_dict: dict[str, Any], old: str, new: str) -> None:
    """Renames, in place, the keys of ``state_dict`` that start with ``old`` to start with ``new``.

    For a submodule renamed since a checkpoint was written; a state dict that has ``new`` keys
    already is left alone.
    """
    if any(key.startswith(new) for key in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[new + key[len(old) :]] = state_dict.pop(key)


def load_method_state(
    checkpoint: dict[str, Any],
    method: str,
    streams: Mapping[str, _Stateful] | None = None,
    optional: Sequence[str] = (),
    renamed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Checks that ``method`` wrote the checkpoint and restores its random streams; returns the entry.

    Args:
        checkpoint: The checkpoint being loaded.
        method: The method id the checkpoint must carry (another one is a clear ``ValueError``).
        streams: Entry name -> object with ``load_state_dict`` (a ``MaskDraws``, a ``CountedStream``).
        optional: Stream entries that older versions did not write (skipped when absent).
        renamed: Old -> new prefix of the submodules renamed since older checkpoints were written; their
            state-dict keys are renamed in place (see :func:`rename_state_prefix`).
    """
    meta = read_meta(checkpoint, method)
    for name, stream in (streams or {}).items():
        if name in optional and name not in meta:
            continue
        stream.load_state_dict(meta[name])
    for old, new in (renamed or {}).items():
        rename_state_prefix(checkpoint.get("state_dict", {}), old, new)
    return meta
