"""MoCo v3 checkpoints: MimCo's teacher from stage 1, and reading the checkpoints of older versions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_mim.checkpoint.files import load_checkpoint, torch_load_weights
from lightning_mim.checkpoint.meta import read_meta
from lightning_mim.checkpoint.weights import load_weights_file
from lightning_mim.methods.settings import MOCOV3_OPTIM, MOCOV3_VIT_HEADS
from lightning_mim.nn.pos_embed import sincos_order_of
from lightning_mim.nn.timm_models import TimmArgs, create_timm_model
from lightning_mim.optim import optim_config

if TYPE_CHECKING:
    from lightning_mim.methods.moco import MoCoV3Module

__all__ = [
    "add_predictor_bn_statistics",
    "build_mimco_teacher",
    "check_encoder_args",
    "check_teacher_grid",
    "load_mocov3_teacher",
    "mocov3_backbone_kwargs",
    "projector_out_dim",
    "written_heads",
]

_STAGE1_HINT = (
    "train one with stage 1 first: `lightning-mim fit --config configs/mocov3_vits.yaml` (or "
    "configs/quickstart/mocov3.yaml) and pass its checkpoint as --model.teacher_ckpt PATH"
)


def mocov3_backbone_kwargs(backbone: str, backbone_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Timm arguments of MoCo v3's encoder: the official head count for ``vit_small_*`` unless given."""
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": "token"}
    for prefix, heads in MOCOV3_VIT_HEADS.items():
        if backbone.startswith(prefix):
            kwargs["num_heads"] = heads
    return {**kwargs, **(backbone_kwargs or {})}


def timm_heads(arch: str, args: dict[str, Any]) -> int:
    """The number of attention heads ``timm.create_model(arch, **args)`` gives (built on the meta device)."""
    if "num_heads" in args:
        return int(args["num_heads"])
    with torch.device("meta"):
        model = create_timm_model(arch, **args)
    return int(model.blocks[0].attn.num_heads)


def written_heads(checkpoint: dict[str, Any]) -> int:
    """The attention heads of the encoder in a MoCo v3 checkpoint.

    Weight shapes cannot tell them apart (a 6-head and a 12-head ViT-S have the same tensors), so
    they are read from what the checkpoint records: its encoder entry or its ``backbone_kwargs``;
    failing both, the default of the version that wrote it: MoCo v3's for 0.2 and later (whose optim
    hyperparameters have a ``decay_rule``), timm's before (0.1 built ``vit_small_*`` with 6 heads).
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    meta = checkpoint.get("lightning_mim") or {}
    recorded = (meta.get("encoders") or {}).get("student") or {}
    arch = str(recorded.get("arch") or hparams.get("backbone"))
    kwargs = dict(recorded.get("model_args") or hparams.get("backbone_kwargs") or {})
    if "num_heads" not in kwargs and "decay_rule" in (hparams.get("optim") or {}):
        kwargs = mocov3_backbone_kwargs(arch, kwargs)
    kwargs.pop("num_classes", None)
    return timm_heads(arch, kwargs)


def check_encoder_args(checkpoint: dict[str, Any], spec: tuple[str, dict[str, Any]], owner: str) -> None:
    """Refuses a checkpoint whose encoder was built with other timm arguments than this module's.

    The recorded ``timm.create_model`` arguments (when the checkpoint has them) must equal the
    module's, and the head count as written (:func:`written_heads`) the module's.
    """
    from lightning_mim.checkpoint.meta import model_args

    arch, kwargs = spec
    built = model_args(kwargs)
    built["num_heads"] = timm_heads(arch, built)
    recorded = ((checkpoint.get("lightning_mim") or {}).get("encoders") or {}).get("student") or {}
    written = dict(recorded.get("model_args", built) or {})
    written["num_heads"] = written_heads(checkpoint)
    written_arch = recorded.get("arch", arch)
    if (written_arch, written) == (arch, built):
        return
    differ = sorted(k for k in {*written, *built} if written.get(k) != built.get(k))
    hint = (
        f" (pass --model.backbone_kwargs '{{num_heads: {written['num_heads']}}}' to load it)"
        if differ == ["num_heads"]
        else ""
    )
    raise ValueError(
        f"{owner}: the checkpoint's encoder is {written_arch}({written}), this module builds "
        f"{arch}({built}); they differ in {differ}{hint}"
    )


def add_predictor_bn_statistics(state_dict: dict[str, Any], predictor: nn.Module, prefix: str) -> None:
    """Completes a lightning-mim 0.1 state dict, whose MoCo v3 predictor had no final BatchNorm.

    The final BatchNorm is non-affine, so only its running statistics are missing; they are added
    as identity statistics (mean 0, variance 1) with a warning: the weights load, and in training
    the BatchNorm normalises with batch statistics as the official predictor does.
    """
    from lightning.pytorch.utilities import rank_zero_warn

    expected = {f"{prefix}{name}": buffer for name, buffer in predictor.named_buffers()}
    missing = [name for name in expected if name not in state_dict]
    if not missing:
        return
    rank_zero_warn(
        "this MoCo v3 checkpoint (lightning-mim 0.1) has a predictor without MoCo v3's final BatchNorm; "
        "it was added with identity running statistics, so the predictor's outputs now follow the official design"
    )
    for name in missing:
        state_dict[name] = (
            torch.zeros_like(expected[name])
            if "mean" in name or "num_batches" in name
            else torch.ones_like(expected[name])
        )


def load_mocov3_teacher(path: str | Path) -> MoCoV3Module:
    """A MoCoV3Module rebuilt from a checkpoint (``weights_only=True``), frozen, eval mode.

    The checkpoint is a stage-1 run's, a converted official one, or an official MoCo v3 file itself
    (converted on loading, see :mod:`lightning_mim.convert`).
    """
    from lightning_mim.convert import detect_format, mocov3_module
    from lightning_mim.methods.moco import MoCoV3Module

    checkpoint = load_checkpoint(path, "teacher checkpoint", _STAGE1_HINT, official=True)
    if detect_format(checkpoint) == "mocov3":
        return mocov3_module(checkpoint, f"teacher checkpoint {path}").requires_grad_(False).eval()
    read_meta(checkpoint, "mocov3")  # a clear error for another method's checkpoint
    if not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise ValueError(f"teacher checkpoint {path} has no hyper_parameters to rebuild the MoCo v3 model from")
    hparams = dict(checkpoint["hyper_parameters"])
    optim = hparams.pop("optim", None)
    for key in ("_instantiator", "_class_path"):
        hparams.pop(key, None)
    try:
        # the heads it was trained with: weight shapes cannot tell a 6-head from a 12-head ViT-S
        hparams["backbone_kwargs"] = {**(hparams.get("backbone_kwargs") or {}), "num_heads": written_heads(checkpoint)}
        module = MoCoV3Module(**hparams, optim=optim_config(optim) if optim else MOCOV3_OPTIM)
    except TypeError as err:  # arguments of another lightning-mim version
        raise ValueError(
            f"teacher checkpoint {path}: its hyper_parameters do not rebuild a MoCoV3Module ({err}); "
            "was it written by another lightning-mim version?"
        ) from err
    check_encoder_args(checkpoint, module._encoder_spec, f"teacher checkpoint {path}")
    add_predictor_bn_statistics(checkpoint["state_dict"], module.predictor, "predictor.")
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:  # missing, unexpected or mis-shaped weights
        raise ValueError(
            f"teacher checkpoint {path}: its weights do not fit the MoCo v3 model of its own hyper_parameters "
            f"({str(err).splitlines()[0]})"
        ) from err
    return module.requires_grad_(False).eval()


def build_mimco_teacher(
    backbone: str,
    backbone_kwargs: dict[str, Any] | None,
    teacher_ckpt: str | None,
    teacher_arch: str | None,
    teacher_weights: str | None,
    teacher_kwargs: dict[str, Any] | None,
    allow_random_teacher: bool,
) -> tuple[nn.Module, nn.Module | None]:
    """MimCo's frozen teacher (eval mode, no gradients) and its projector (None for a timm teacher).

    From a stage-1 checkpoint, a timm architecture with local weights, or (smoke runs) a random MoCo v3
    ViT of the student's size; the arguments are :class:`~lightning_mim.MimCoModule`'s.
    """
    if teacher_ckpt is not None:
        stage1 = load_mocov3_teacher(teacher_ckpt)
        return stage1.encoder(), stage1.projector
    if teacher_arch is not None:
        if teacher_weights is None or not Path(teacher_weights).expanduser().is_file():
            raise FileNotFoundError(f"teacher_weights must name a local weights file for {teacher_arch!r}")
        names = TimmArgs("MimCoModule", "teacher_arch", "teacher_kwargs")
        teacher = create_timm_model(teacher_arch, names, num_classes=0, global_pool="token", **(teacher_kwargs or {}))
        weights = Path(teacher_weights).expanduser()
        try:
            load_weights_file(teacher, weights, ignore=("head.", "fc_norm."))
        except ValueError as err:  # on failure only: say so when the file is an official MoCo v3 checkpoint
            from lightning_mim.convert import detect_format

            try:
                raw = torch_load_weights(weights) if weights.suffix != ".safetensors" else None
            except ValueError:  # unreadable: the first error says why
                raw = None
            if isinstance(raw, dict) and detect_format(raw) == "mocov3":
                raise ValueError(
                    f"MimCoModule(teacher_weights={str(weights)!r}): an official MoCo v3 checkpoint; pass it as "
                    "teacher_ckpt, which builds MoCo v3's architecture (12 heads for vit_small) and its projector"
                ) from err
            raise
        hint = "pass teacher_kwargs {num_heads: %d}, or the original MoCo v3 checkpoint as teacher_ckpt"
        check_mocov3_heads(teacher, f"MimCoModule(teacher_weights={str(weights)!r})", hint)
        return teacher.requires_grad_(False).eval(), None
    if allow_random_teacher:
        from lightning_mim.methods.moco import MoCoV3Module

        stage1 = MoCoV3Module(backbone, backbone_kwargs)
        return stage1.encoder().requires_grad_(False).eval(), stage1.projector.requires_grad_(False).eval()
    raise ValueError(f"MimCo needs a frozen contrastive teacher: no teacher_ckpt given; {_STAGE1_HINT}")


#: Widths at which MoCo v3's ViT (``vits.py``) has other heads than timm's: its ViT-S, 12 (timm's: 6).
MOCOV3_HEADS_BY_WIDTH = {384: 12}


def check_mocov3_heads(model: nn.Module, owner: str, hint: str) -> None:
    """Refuses a MoCo v3 ViT built with timm's heads instead of MoCo v3's; ``hint % heads`` says what to do.

    Bare weights do not say their heads, and a 6-head and a 12-head ViT-S have the same tensors. But
    MoCo v3 fixes the position table to its sin-cos layout (rows first; MAE's and timm's differ), so
    weights that carry it come from MoCo v3 (for example through its ``convert_to_deit.py``).
    """
    table, patch_embed = getattr(model, "pos_embed", None), getattr(model, "patch_embed", None)
    if not isinstance(table, torch.Tensor) or patch_embed is None or not hasattr(model, "blocks"):
        return
    grid = (int(patch_embed.grid_size[0]), int(patch_embed.grid_size[1]))
    width, heads = int(table.shape[-1]), int(cast(Any, model).blocks[0].attn.num_heads)
    expected = MOCOV3_HEADS_BY_WIDTH.get(width)
    if expected is None or heads == expected or sincos_order_of(table, grid) != "rows_first":
        return
    raise ValueError(
        f"{owner}: its pos_embed is MoCo v3's fixed sin-cos table (rows first), so these are MoCo v3 ViT weights, "
        f"whose {width}-wide ViT has {expected} attention heads; this architecture has {heads}, which would load "
        f"without an error and compute wrongly: {hint % expected}"
    )


def check_teacher_grid(owner: str, teacher: Any, student: Any) -> None:
    """MimCo's teacher sees the student's images and its patches pair one to one with the student's.

    Args:
        owner: The module, for the message.
        teacher: The frozen timm teacher.
        student: The student's :class:`~lightning_mim.nn.MaskedViT`.
    """
    patch_embed = getattr(teacher, "patch_embed", None)
    grid = tuple(int(g) for g in getattr(patch_embed, "grid_size", ()))
    size = tuple(int(s) for s in getattr(patch_embed, "img_size", ()))
    student_embed = student.vit.patch_embed
    student_size = (int(student_embed.img_size[0]), int(student_embed.img_size[1]))
    if grid != student.grid_size or size != student_size:
        raise ValueError(
            f"{owner}: the teacher's patch grid {grid or 'none (not a ViT)'} at {size or '?'} px does not match "
            f"the student's {student.grid_size} at {student_size} px; the patch-level loss pairs student "
            "and teacher patches one to one, so build the student (backbone, backbone_kwargs img_size / "
            "patch_size) like the teacher"
        )


def projector_out_dim(projector: nn.Module) -> int:
    """The output width of a projector: that of its last Linear layer."""
    return int([m for m in projector.modules() if isinstance(m, nn.Linear)][-1].out_features)
