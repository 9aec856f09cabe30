"""Building timm models with errors that name the caller's own arguments.

timm reports an unknown name as ``RuntimeError: Unknown model``, bad keyword arguments as a
``TypeError`` or an ``AssertionError`` from deep inside a constructor, and accepts an image size that
the patch size does not divide (the patch embedding then silently drops the last pixels). The
helpers here turn each of these into a ``ValueError`` that says which argument of which class is
wrong, e.g. ``ConMIMModule(backbone='vit_nonexistent'): unknown timm architecture; see
timm.list_models('vit_*')``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
from torch import nn

__all__ = [
    "TOKEN_MODEL_FAMILIES",
    "TimmArgs",
    "check_patch_grid",
    "create_timm_model",
    "is_token_model",
    "mean_pooling_kwargs",
    "timm_family",
]


@dataclass(frozen=True)
class TimmArgs:
    """The names, in a caller's signature, of a timm architecture and of its timm arguments.

    Attributes:
        owner: The class or function the user called (``"ConMIMModule"``).
        arch: Its argument holding the timm name (``"backbone"``).
        kwargs: Its argument holding the timm keyword arguments (``"backbone_kwargs"``).
    """

    owner: str = "timm.create_model"
    arch: str = "model_name"
    kwargs: str = "kwargs"


def _pattern(name: str) -> str:
    """A ``timm.list_models`` pattern for names like ``name``: its family prefix if timm has one."""
    prefix = name.split("_")[0]
    return f"{prefix}_*" if prefix and timm.list_models(f"{prefix}_*") else "*vit*"


def timm_family(arch: str, names: TimmArgs | None = None) -> str:
    """The timm module that defines ``arch`` (e.g. ``timm.models.resnet``).

    Raises:
        ValueError: timm has no such architecture (the message names ``names.owner`` and ``names.arch``).
    """
    names = names or TimmArgs()
    name = timm.models.split_model_name_tag(arch)[0]
    if not timm.is_model(name):
        raise ValueError(
            f"{names.owner}({names.arch}={arch!r}): unknown timm architecture; see timm.list_models({_pattern(name)!r})"
        )
    return str(timm.models.model_entrypoint(name).__module__)


#: The timm modules of token models (ViT, BEiT): patch tokens out, ``forward_head`` pools them.
TOKEN_MODEL_FAMILIES = ("timm.models.vision_transformer", "timm.models.beit")


def is_token_model(arch: str, names: TimmArgs | None = None) -> bool:
    """Whether ``arch`` is a timm ViT/BEiT (token outputs) rather than a CNN.

    Raises:
        ValueError: timm has no such architecture (see :func:`timm_family`).
    """
    return timm_family(arch, names) in TOKEN_MODEL_FAMILIES


def check_patch_grid(model: nn.Module, names: TimmArgs | None = None) -> None:
    """Checks that a timm ViT/BEiT's patch size divides its image size (no-op for models without patches).

    Raises:
        ValueError: It does not: timm would silently drop the pixels past the last whole patch.
    """
    names = names or TimmArgs()
    patch_embed = getattr(model, "patch_embed", None)
    img_size, patch_size = getattr(patch_embed, "img_size", None), getattr(patch_embed, "patch_size", None)
    if img_size is None or patch_size is None:
        return
    height, width = int(img_size[0]), int(img_size[1])
    patch_h, patch_w = int(patch_size[0]), int(patch_size[1])
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"{names.owner}({names.kwargs}): image size {height}x{width} is not divisible by the patch size "
            f"{patch_h}x{patch_w}; the patch embedding would silently drop the last {height % patch_h} pixel rows "
            f"and {width % patch_w} columns (set img_size to a multiple of patch_size)"
        )


def create_timm_model(arch: str, names: TimmArgs | None = None, **kwargs: Any) -> Any:
    """``timm.create_model(arch, **kwargs)``, with a ``ValueError`` naming the caller's argument on failure.

    Args:
        arch: timm model name (a pretrained tag such as ``.augreg_in21k`` is allowed).
        names: The caller's argument names, for error messages.
        **kwargs: Passed to ``timm.create_model``.

    Returns:
        The model, typed ``Any``: timm's submodules are reached by attribute.

    Raises:
        ValueError: Unknown architecture, arguments the architecture rejects, or (ViT/BEiT) an image
            size that is not a multiple of the patch size.
    """
    names = names or TimmArgs()
    timm_family(arch, names)
    try:
        model = timm.create_model(arch, **kwargs)
    except (TypeError, AssertionError) as err:  # unknown keyword, or e.g. width not divisible by heads
        raise ValueError(
            f"{names.owner}({names.kwargs}={kwargs!r}): timm cannot build {arch!r} with these arguments "
            f"({type(err).__name__}: {err})"
        ) from err
    check_patch_grid(model, names)
    return model


#: The timm argument that moves a family's final norm after pooling (``True``) or keeps it per token.
_FC_NORM_FLAG = {"timm.models.vision_transformer": "fc_norm", "timm.models.beit": "use_fc_norm"}
_POOLINGS = ("avg", "token")


def mean_pooling_kwargs(family: str, kwargs: dict[str, Any], names: TimmArgs | None = None) -> dict[str, Any]:
    """``kwargs`` for a timm ViT/BEiT whose final norm stays on every token, pooled by mean by default.

    Under these arguments timm's own pooled features (``model(x)`` with ``num_classes=0``, or
    ``forward_head(tokens, pre_logits=True)``) are the mean of the final-normed patch tokens
    (``global_pool="avg"``) or the final-normed CLS token (``global_pool="token"``), while
    ``forward_features`` gives the final-normed tokens that pre-training losses use. timm's default
    for mean pooling moves the final norm after the pooling instead (``fc_norm`` / ``use_fc_norm``),
    which takes it off the tokens; so that flag is set to ``False``, and written with the other
    arguments into exports, where ``timm.create_model`` rebuilds the same pooling.

    Args:
        family: :func:`timm_family` of the architecture (ViT or BEiT; others are returned unchanged).
        kwargs: The caller's timm arguments (not modified).
        names: The caller's argument names, for error messages.

    Raises:
        ValueError: ``global_pool`` other than ``"avg"`` or ``"token"``, or the flag set to ``True``.
    """
    flag = _FC_NORM_FLAG.get(family)
    if flag is None:
        return dict(kwargs)
    names = names or TimmArgs()
    out = {"global_pool": "avg", **kwargs}
    if out["global_pool"] not in _POOLINGS:
        raise ValueError(
            f"{names.owner}({names.kwargs}): global_pool={out['global_pool']!r}; a pre-trained encoder pools its "
            f"features by 'avg' (mean of the patch tokens) or 'token' (the CLS token)"
        )
    if out.get(flag):
        raise ValueError(
            f"{names.owner}({names.kwargs}): {flag}=True moves timm's final norm from the tokens to after "
            "the pooling; pre-training needs it on every token (leave it unset)"
        )
    out[flag] = False
    return out
