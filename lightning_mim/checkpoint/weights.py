"""Encoder weights for a timm model from an export folder or a method checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_mim.checkpoint.files import load_checkpoint, torch_load_weights
from lightning_mim.checkpoint.meta import encoder_state
from lightning_mim.nn.timm_models import TimmArgs, create_timm_model, is_token_model, timm_family

__all__ = ["load_encoder", "load_weights_file", "read_weights"]

_ALLOWED_MISSING = ("head.", "fc.", "fc_norm.")  # new classifier and pooled-feature norm
_ALLOWED_UNEXPECTED = ("norm.",)  # the per-token final norm, replaced by fc_norm under mean pooling
_NORM_PLACEMENT = ("fc_norm", "use_fc_norm")  # timm arguments placing the final norm before/after pooling


def read_weights(weights: str, which: str | None) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(arch, model args, state dict) from an export folder (config.json + model.safetensors) or a method checkpoint."""
    path = Path(weights).expanduser()
    if path.is_dir():
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(f"{path} is not an export folder (needs config.json and model.safetensors)")
        from safetensors.torch import load_file

        config = json.loads(config_file.read_text())
        return config["architecture"], dict(config["model_args"]), load_file(str(weights_file))
    if not path.exists():
        raise FileNotFoundError(f"pre-trained weights not found: {path} (an export folder or a method checkpoint)")
    _, arch, args, state = encoder_state(load_checkpoint(path, "pre-trained weights"), which)
    return arch, args, state


def load_encoder(
    weights: str | None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    which: str | None = None,
    global_pool: str | None = None,
    random_init: bool = False,
    **overrides: Any,
) -> nn.Module:
    """A timm model with pre-trained encoder weights (or random ones when ``weights`` is None).

    Args:
        weights: Export folder, method checkpoint, or None for a random initialisation of ``arch``.
        arch: timm name; read from the weights when None.
        model_kwargs: timm arguments; those of the weights are the base.
        which: Encoder of a checkpoint (``student`` / ``teacher``; None: the method's recommendation).
        global_pool: timm pooling of ViT/BEiT models (``"avg"`` or ``"token"``), with timm's own
            placement of the final norm for it (``"avg"``: a new ``fc_norm`` after the mean); None keeps
            the pooling the weights were exported with. Ignored for CNNs.
        random_init: Build the architecture of ``weights`` but keep timm's random initialisation (the
            baseline of an evaluation protocol).
        **overrides: Further timm arguments (``num_classes``, ``drop_path_rate``, ``global_pool``).

    Missing keys may only be the new classifier (and ``fc_norm`` under mean pooling); the encoder's
    own final ``norm`` may go unused under mean pooling. Anything else is an error that names the keys.
    """
    saved_arch, saved_args, state = (None, {}, None) if weights is None else read_weights(weights, which)
    arch = arch or saved_arch
    if arch is None:
        raise ValueError("give `arch` (a timm name) when there are no pre-trained weights")
    names = TimmArgs("load_encoder", "arch", "model_kwargs")
    timm_family(arch, names)  # unknown names: an error that says so, before anything else
    if global_pool is not None and is_token_model(arch):
        overrides["global_pool"] = global_pool
        # The pre-training export keeps the final norm on every token (fc_norm=False); a pooling
        # chosen here gets timm's own norm placement for it (mean pooling: a new fc_norm after the
        # mean, as the official fine-tuning code of BEiT, MAE and ConMIM has it).
        saved_args = {k: v for k, v in saved_args.items() if k not in _NORM_PLACEMENT}
    kwargs = {**saved_args, **(model_kwargs or {}), **overrides}
    model = create_timm_model(arch, names, **kwargs)
    if state is not None and not random_init:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{weights} does not fit {arch} {kwargs}: {str(err).splitlines()[1:3]}") from err
        bad_missing = [k for k in missing if not k.startswith(_ALLOWED_MISSING)]
        bad_unexpected = [k for k in unexpected if not k.startswith(_ALLOWED_UNEXPECTED)]
        if bad_missing or bad_unexpected:
            raise ValueError(
                f"{weights} does not fit {arch}: missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}"
            )
    return model


def load_weights_file(model: nn.Module, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Loads weights from a .safetensors or a tensor-only .pth/.pt file (``weights_only=True``) into ``model``.

    A ``state_dict`` or ``model`` wrapper is unwrapped; unexpected keys starting with ``ignore`` (e.g.
    a classifier) are skipped; any other mismatch is a ``ValueError`` naming the keys.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt files
            raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    else:
        state = torch_load_weights(path)
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of teacher weights")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path} does not fit the teacher architecture: {str(err).splitlines()[1:3]}") from err
    unexpected = [k for k in unexpected if not k.startswith(ignore)]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the teacher architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
