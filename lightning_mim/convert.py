"""Official checkpoints as lightning-mim checkpoints: MoCo v3, MAE, ConMIM and CMAE.

:func:`convert` reads an official file with ``weights_only=True``, renames its keys to those of the
module it corresponds to, loads them into that module strictly (every tensor must find its place, and
every place a tensor), and writes a lightning-mim checkpoint. MimCo's ``teacher_ckpt``, fine-tuning,
linear probing and ``lightning-mim export`` read it like one of their own; MimCo's ``teacher_ckpt``
also takes the official file directly (:func:`detect_format`). The converted checkpoint holds weights
only: the methods' ``weights`` argument continues pre-training from it with a new optimiser.

MoCo v3 (facebookresearch/moco-v3, ``main_moco.py``: ``save_checkpoint``) writes ``{"epoch", "arch",
"state_dict", "optimizer", "scaler"}``; ``state_dict`` is the DDP-wrapped model's, so every key starts
with ``module.``. The ViT keeps timm's names; its ``head`` is the 3-layer projector and the predictor
is a 2-layer MLP, both built by ``_build_mlp`` with the layer indices of
:class:`~lightning_mim.nn.BNProjector`. The mapping (official -> :class:`~lightning_mim.MoCoV3Module`):

====================================  ================================
``module.base_encoder.head.N.*``      ``base.projector.N.*``
``module.base_encoder.*``             ``base.encoder.*``
``module.momentum_encoder.head.N.*``  ``momentum_branch.projector.N.*``
``module.momentum_encoder.*``         ``momentum_branch.encoder.*``
``module.predictor.N.*``              ``predictor.N.*``
====================================  ================================

The released ViTs are ``vit_small`` (12 heads, not timm's 6) and ``vit_base``; the file's ``arch``
decides the architecture and its tensors the sizes. Heads cannot be read from weight shapes, so a file
without a known ``arch`` is refused.

MAE (facebookresearch/mae, ``util/misc.py``: ``save_model``) writes ``{"model", "optimizer", "epoch",
"scaler", "args"}``, ``args`` an ``argparse.Namespace`` (the one object let through the weights-only
loader); the released ``mae_pretrain_vit_*.pth`` hold the encoder alone under ``model``. The encoder
keeps timm's names; it maps to the online encoder of :class:`~lightning_mim.CMAEModule` with
``contrastive_weight=0`` (MAE), and a decoder in the file to its pixel decoder:

====================================  ================================
encoder keys (``cls_token``, ...)     ``online_encoder.vit.*``
``mask_token``                        ``pixel_decoder.mask_token``
``decoder_embed.*``                   ``pixel_decoder.embed.*``
``decoder_blocks.N.*``                ``pixel_decoder.blocks.N.*``
``decoder_norm.*``                    ``pixel_decoder.norm.*``
``decoder_pred.*``                    ``pixel_decoder.head.*``
``decoder_pos_embed``                 (fixed sin-cos; checked equal to ours, not stored)
====================================  ================================

The architecture comes from ``args.model`` (``mae_vit_base_patch16``, ...) or, for the released files
without ``args``, from the encoder's width (768: ViT-B, 1024: ViT-L, 1280: ViT-H/14), with MAE's heads
(and 16 in the decoder at every size), which weight shapes cannot tell; the other sizes come from the
tensors. A file without a decoder gets MAE's initialisation for it (recorded in ``converted_from``).

ConMIM (TencentARC/ConMIM, ``utils.py``: ``save_model`` and ``save_model_copy``) writes the student as
``checkpoint-N.pth`` and the teacher as ``checkpoint_copy-N.pth``, each ``{"model", "optimizer",
"epoch", "scaler", "args"}``; the official fine-tuning starts from the copy. The BEiT backbone keeps
timm's ``Beit`` names; ``lm_head`` (unused by ConMIM) and the ``relative_position_index`` buffers
(timm rebuilds them) are dropped. Each file maps to one branch of :class:`~lightning_mim.ConMIMModule`:

====================================  ================================
backbone keys (``cls_token``, ...)    ``{branch}.encoder.vit.*``
``mask_token``                        ``{branch}.encoder.mask_token``
``projectors.N.*``                    ``{branch}.projector.N.*``
====================================  ================================

The student file fills the student and the copy the teacher; given one file, both branches get it
(as the official run starts its teacher). The architecture comes from ``args.model`` or the width.
ConMIM's released weights are fine-tuned ones, not these.

CMAE (ZhichengHuang/CMAE, mmengine) keeps weights under ``state_dict`` with mmcv's ViT names. The
released pre-training files are the online encoder alone, as ``tools/extract_backbone_weights.py``
writes them (``{"state_dict": {...}, "author": "CMAE"}``, the ``backbone.`` prefix stripped); a whole
model's ``state_dict`` holds every part under the prefixes below. (A training checkpoint as mmengine's
``Runner`` saves it also pickles mmengine's log objects, which ``weights_only=True`` refuses.) The ViT
names map to timm's: ``patch_embed.projection`` -> ``patch_embed.proj``, ``layers.N`` -> ``blocks.N``,
``ln1``/``ln2`` in a layer -> ``norm1``/``norm2``, ``ffn.layers.0.0`` -> ``mlp.fc1``, ``ffn.layers.1``
-> ``mlp.fc2``, the final ``ln1`` -> ``norm``; the decoders' ``decoder_embed``, ``decoder_blocks``,
``ln1`` and ``decoder_pred`` -> ``embed``, ``blocks``, ``norm``, ``head``; the 2-layer necks'
``fc0``, ``bn0``, ``fc1`` -> ``0``, ``1``, ``3``. Into :class:`~lightning_mim.CMAEModule`:

====================================  ======================================
``backbone.*`` (or the bare encoder)  ``online_encoder.vit.*``
``target_backbone.*``                 ``target_encoder.vit.*`` (no final norm)
``pixel_decoder.*``                   ``pixel_decoder.*``
``feature_decoder.*``                 ``online_heads.feature_decoder.*``
``projector.*``                       ``online_heads.projector.*``
``head.predictor.*``                  ``online_heads.predictor.*``
``target_projector.*``                ``target_projector.*``
``*.decoder_pos_embed``               (fixed sin-cos; checked equal to ours, not stored)
====================================  ======================================

The architecture is the one of CMAE's ``arch_zoo`` with the encoder's width and MLP width (``b``:
768 and 3072, 12 heads; ``l``: 1024 and 4096, 16 heads; ``s``: 768 and 2304, 8 heads), the other
sizes from the tensors, 16 decoder heads (the official config's). An encoder alone gets a target
encoder copied from it (as the official run starts) and freshly initialised decoders and necks;
the sin-cos tables follow the file's (CMAE's: rows first).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning
import lightning.pytorch as pl
import torch

from lightning_mim.checkpoint.files import torch_load_weights
from lightning_mim.checkpoint.io import AtomicCheckpointIO
from lightning_mim.nn.pos_embed import sincos_order_of

if TYPE_CHECKING:
    from lightning_mim.methods.cmae import CMAEModule
    from lightning_mim.methods.conmim import ConMIMModule
    from lightning_mim.methods.moco import MoCoV3Module

__all__ = [
    "CMAE_ARCHS",
    "CONMIM_ARCHS",
    "MAE_ARCHS",
    "MOCOV3_ARCHS",
    "OFFICIAL_FORMATS",
    "cmae_module",
    "conmim_module",
    "convert",
    "detect_format",
    "mae_module",
    "mocov3_module",
]

#: The official formats :func:`convert` reads.
OFFICIAL_FORMATS = ("mocov3", "mae", "conmim", "cmae")

#: ConMIM's ``args.model`` names (``modeling_pretrain.py``) -> (timm BEiT, its arguments over ours).
CONMIM_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "conmim_small_patch16_224": ("beit_base_patch16_224", {"embed_dim": 384, "num_heads": 6}),
    "conmim_base_patch16_224": ("beit_base_patch16_224", {}),
    "conmim_large_patch16_224": ("beit_large_patch16_224", {}),
}
_CONMIM_BY_WIDTH = {384: "conmim_small_patch16_224", 768: "conmim_base_patch16_224", 1024: "conmim_large_patch16_224"}

#: MAE's ``args.model`` names (``models_mae.py``) -> the timm architecture with the same heads.
MAE_ARCHS = {
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
}
_MAE_BY_WIDTH = {768: "mae_vit_base_patch16", 1024: "mae_vit_large_patch16", 1280: "mae_vit_huge_patch14"}
_MAE_DECODER = (
    ("mask_token", "pixel_decoder.mask_token"),
    ("decoder_embed.", "pixel_decoder.embed."),
    ("decoder_blocks.", "pixel_decoder.blocks."),
    ("decoder_norm.", "pixel_decoder.norm."),
    ("decoder_pred.", "pixel_decoder.head."),
)

#: CMAE's ``arch_zoo`` (``vision_transformer.py``): (width, MLP width) -> (arch, timm model, its arguments over timm's).
CMAE_ARCHS: dict[tuple[int, int], tuple[str, str, dict[str, Any]]] = {
    (768, 3072): ("b", "vit_base_patch16_224", {}),
    (1024, 4096): ("l", "vit_large_patch16_224", {}),
    (768, 2304): ("s", "vit_base_patch16_224", {"num_heads": 8, "mlp_ratio": 3.0}),
}
#: Official CMAE model prefix -> ours (a whole model's ``state_dict``).
_CMAE_PREFIXES = (
    ("backbone.", "online_encoder.vit."),
    ("target_backbone.", "target_encoder.vit."),
    ("pixel_decoder.", "pixel_decoder."),
    ("feature_decoder.", "online_heads.feature_decoder."),
    ("projector.", "online_heads.projector."),
    ("head.predictor.", "online_heads.predictor."),
    ("target_projector.", "target_projector."),
)
#: mmcv's names inside a transformer layer -> timm's ``Block``.
_MMCV_LAYER = (
    ("ln1.", "norm1."),
    ("ln2.", "norm2."),
    ("attn.qkv.", "attn.qkv."),
    ("attn.proj.", "attn.proj."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
)
#: mmcv's (mmselfsup's) top-level names of a ViT and of an MAE decoder -> timm's and ours.
_MMCV_TOP = {
    "encoder": (
        ("cls_token", "cls_token"),
        ("pos_embed", "pos_embed"),
        ("patch_embed.projection.", "patch_embed.proj."),
        ("ln1.", "norm."),
    ),
    "decoder": (
        ("mask_token", "mask_token"),
        ("decoder_embed.", "embed."),
        ("ln1.", "norm."),
        ("decoder_pred.", "head."),
    ),
    "neck": (("fc0.", "0."), ("bn0.", "1."), ("fc1.", "3.")),
}

#: MoCo v3's ViT ``arch`` names (``vits.py``) -> the timm architecture with the same defaults.
MOCOV3_ARCHS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}

#: Official prefix -> ours, the projectors (``head``) before the encoders that contain them.
_MOCOV3_PREFIXES = (
    ("module.base_encoder.head.", "base.projector."),
    ("module.base_encoder.", "base.encoder."),
    ("module.momentum_encoder.head.", "momentum_branch.projector."),
    ("module.momentum_encoder.", "momentum_branch.encoder."),
    ("module.predictor.", "predictor."),
)

#: The sizes of the timm architectures in ``MOCOV3_ARCHS``: (embed_dim, depth, patch_size, img_size).
_TIMM_SIZES = {
    "vit_small_patch16_224": (384, 12, 16, 224),
    "vit_base_patch16_224": (768, 12, 16, 224),
    "vit_large_patch16_224": (1024, 24, 16, 224),
    "vit_huge_patch14_224": (1280, 32, 14, 224),
}


def detect_format(checkpoint: dict[str, Any]) -> str | None:
    """The official format a loaded checkpoint has (one of ``OFFICIAL_FORMATS``), or None.

    MoCo v3: a DDP-wrapped ``state_dict`` with ``module.base_encoder.*``; ConMIM: BEiT blocks or its
    ``projectors`` under ``model``; MAE: a timm ViT under ``model``; CMAE: mmcv's ViT names
    (``patch_embed.projection``) under ``state_dict``. A lightning-mim checkpoint is none.
    """
    if "lightning_mim" in checkpoint:
        return None
    state, model = checkpoint.get("state_dict"), checkpoint.get("model")
    if isinstance(state, dict) and any(str(key).startswith("module.base_encoder.") for key in state):
        return "mocov3"
    if isinstance(state, dict) and any(str(key).endswith("patch_embed.projection.weight") for key in state):
        return "cmae"
    if not isinstance(model, dict) or "patch_embed.proj.weight" not in model:
        return None
    if "projectors.0.weight" in model or "blocks.0.attn.q_bias" in model:
        return "conmim"
    return "mae" if "cls_token" in model else None


def _describe(checkpoint: dict[str, Any]) -> str:
    """What a checkpoint looks like, for an error: its format, or its top-level keys."""
    found = detect_format(checkpoint)
    if found is not None:
        return f"an official {found} checkpoint"
    if "lightning_mim" in checkpoint:
        return f"a lightning-mim {checkpoint['lightning_mim'].get('method')} checkpoint"
    return f"a file with the top-level keys {sorted(map(str, checkpoint))[:8]}"


def _mocov3_state(state_dict: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The official MoCo v3 state dict under :class:`~lightning_mim.MoCoV3Module`'s names."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _MOCOV3_PREFIXES if key.startswith(p[0])), None)
        if prefix is None:
            raise ValueError(
                f"{source}: the MoCo v3 key {key!r} belongs to no part of the model (expected "
                f"{', '.join(p for p, _ in _MOCOV3_PREFIXES[1::2])} or module.predictor.)"
            )
        renamed[prefix[1] + key[len(prefix[0]) :]] = value
    return renamed


def _official_arch(args: Any, model: dict[str, Any], by_width: dict[int, str], known: Any, what: str) -> str:
    """The official model name: a training checkpoint's ``args.model``, else (released files) the one of its width."""
    width = int(model["cls_token"].shape[-1])
    arch = getattr(args, "model", None) if args is not None else by_width.get(width)
    if arch not in known:
        raise ValueError(f"{what} model {arch!r} (encoder width {width}); lightning-mim converts {sorted(known)}")
    return str(arch)


def _load_exactly(module: torch.nn.Module, state: dict[str, Any], failure: str, fresh: tuple[str, ...] = ()) -> None:
    """Loads ``state`` into ``module``; a tensor without a place, or a place without one, is ``failure``.

    Places under ``fresh`` (parts the file does not hold) may stay as initialised.
    """
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape than its place
        raise ValueError(f"{failure}: {str(err).splitlines()[-1].strip()}") from err
    missing = [key for key in missing if not key.startswith(fresh)] if fresh else missing
    if missing or unexpected:
        raise ValueError(f"{failure}: missing {missing[:4]}, unexpected {unexpected[:4]}")


def _count_blocks(state: dict[str, Any], prefix: str) -> int:
    """The number of blocks ``prefix`` + index in ``state``."""
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


def _vit_sizes(state: dict[str, torch.Tensor], backbone: str, prefix: str) -> dict[str, Any]:
    """The timm arguments in which the ViT under ``prefix`` differs from ``backbone``'s defaults (from shapes)."""
    width = int(state[f"{prefix}cls_token"].shape[-1])
    patch = int(state[f"{prefix}patch_embed.proj.weight"].shape[-1])
    side = round((int(state[f"{prefix}pos_embed"].shape[1]) - 1) ** 0.5)
    depth = _count_blocks(state, f"{prefix}blocks.")
    read = dict(zip(("embed_dim", "depth", "patch_size", "img_size"), (width, depth, patch, side * patch), strict=True))
    defaults = dict(zip(read, _TIMM_SIZES[backbone], strict=True))
    return {name: value for name, value in read.items() if value != defaults[name]}


def mocov3_module(checkpoint: dict[str, Any], source: str = "MoCo v3 checkpoint") -> MoCoV3Module:
    """A :class:`~lightning_mim.MoCoV3Module` holding an official MoCo v3 checkpoint's weights.

    Args:
        checkpoint: The official file, loaded (``{"arch", "state_dict", ...}``).
        source: What to call it in errors (its path).

    Raises:
        ValueError: Not a MoCo v3 ViT checkpoint (another format, ResNet-50 or a conv-stem ViT), or
            weights that do not fill the model exactly.
    """
    from lightning_mim.methods.moco import MoCoV3Module

    if detect_format(checkpoint) != "mocov3":
        raise ValueError(f"{source}: not an official MoCo v3 checkpoint; it looks like {_describe(checkpoint)}")
    arch = checkpoint.get("arch")
    if arch not in MOCOV3_ARCHS:
        raise ValueError(
            f"{source}: MoCo v3 arch {arch!r}; lightning-mim converts the ViTs {sorted(MOCOV3_ARCHS)} "
            "(MoCo v3's ResNet-50 and conv-stem ViTs are not supported)"
        )
    state = _mocov3_state(checkpoint["state_dict"], source)
    hidden, out = (int(state[f"base.projector.{i}.weight"].shape[0]) for i in (0, 6))
    backbone = MOCOV3_ARCHS[str(arch)]
    module = MoCoV3Module(backbone, _vit_sizes(state, backbone, "base.encoder."), proj_hidden_dim=hidden, proj_dim=out)
    _load_exactly(module, state, f"{source}: its weights do not fill the MoCo v3 {arch} model")
    return module


def mae_module(checkpoint: dict[str, Any], source: str = "MAE checkpoint") -> tuple[CMAEModule, str, bool]:
    """An MAE :class:`~lightning_mim.CMAEModule` (``contrastive_weight=0``) holding an official MAE checkpoint.

    Returns:
        The module, the MAE architecture it was built as, and whether the file held the decoder (without
        it, the pixel decoder keeps MAE's initialisation).

    Raises:
        ValueError: Not an MAE checkpoint, an architecture that is not MAE's, or weights that do not fit.
    """
    from lightning_mim.methods.cmae import MAE_OPTIM, CMAEModule

    model = checkpoint.get("model")
    if detect_format(checkpoint) != "mae" or not isinstance(model, dict):
        raise ValueError(f"{source}: not an official MAE checkpoint; it looks like {_describe(checkpoint)}")
    arch = _official_arch(checkpoint.get("args"), model, _MAE_BY_WIDTH, MAE_ARCHS, f"{source}: MAE")
    state: dict[str, torch.Tensor] = {}
    decoder_table = None
    for key, value in model.items():
        if key == "decoder_pos_embed":
            decoder_table = value
            continue
        target = next((new + key[len(old) :] for old, new in _MAE_DECODER if key.startswith(old)), None)
        state[target or f"online_encoder.vit.{key}"] = value
    with_decoder = any(key.startswith("pixel_decoder.") for key in state)
    backbone = MAE_ARCHS[str(arch)]
    sizes = _vit_sizes(state, backbone, "online_encoder.vit.")
    decoder: dict[str, Any] = {}
    if with_decoder:
        decoder_dim = int(state["pixel_decoder.embed.weight"].shape[0])
        decoder = {"decoder_dim": decoder_dim, "decoder_depth": _count_blocks(state, "pixel_decoder.blocks.")}
    module = CMAEModule(backbone, sizes, contrastive_weight=0.0, optim=MAE_OPTIM, **decoder)
    if decoder_table is not None and with_decoder:
        ours = cast(torch.Tensor, module.pixel_decoder.pos_embed)  # (1, N, dim): MAE's table without the CLS row
        if not torch.allclose(decoder_table[:, -ours.shape[1] :].float(), ours, atol=1e-5):
            raise ValueError(f"{source}: its decoder_pos_embed is not MAE's fixed sin-cos table of this grid")
    fresh = () if with_decoder else ("pixel_decoder.",)  # a file without the decoder: MAE's initialisation
    _load_exactly(module, state, f"{source}: its weights do not fill the MAE {arch} model", fresh)
    return module, arch, with_decoder


def _conmim_branch(model: dict[str, torch.Tensor], branch: str) -> dict[str, torch.Tensor]:
    """One ConMIM network's weights under the names of ``branch`` (student or teacher) of ConMIMModule."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        if key.startswith("lm_head.") or key.endswith("relative_position_index"):
            continue  # unused by ConMIM; rebuilt by timm
        if key == "mask_token":
            state[f"{branch}.encoder.mask_token"] = value
        elif key.startswith("projectors."):
            state[f"{branch}.projector.{key[len('projectors.') :]}"] = value
        else:
            state[f"{branch}.encoder.vit.{key}"] = value
    return state


def conmim_module(
    student: dict[str, Any], teacher: dict[str, Any] | None = None, source: str = "ConMIM checkpoint"
) -> tuple[ConMIMModule, str]:
    """A :class:`~lightning_mim.ConMIMModule` holding official ConMIM checkpoints; and the arch it was built as.

    Args:
        student: The official student file (``checkpoint-N.pth``), loaded.
        teacher: The teacher copy (``checkpoint_copy-N.pth``), loaded; None: the student's weights.
        source: What to call them in errors.
    """
    from lightning_mim.methods.conmim import ConMIMModule

    files = [student] if teacher is None else [student, teacher]
    for checkpoint in files:
        if detect_format(checkpoint) != "conmim":
            raise ValueError(f"{source}: not an official ConMIM checkpoint; it looks like {_describe(checkpoint)}")
    model = student["model"]
    if "pos_embed" in model or "rel_pos_bias.relative_position_bias_table" not in model:
        raise ValueError(
            f"{source}: a ConMIM backbone with absolute or per-layer position embeddings; lightning-mim converts "
            "the official default (a shared relative position bias, no absolute embedding)"
        )
    arch = _official_arch(student.get("args"), model, _CONMIM_BY_WIDTH, CONMIM_ARCHS, f"{source}: ConMIM")
    width = int(model["cls_token"].shape[-1])
    backbone, kwargs = CONMIM_ARCHS[str(arch)]
    patch = int(model["patch_embed.proj.weight"].shape[-1])
    window = round(((int(model["rel_pos_bias.relative_position_bias_table"].shape[0]) - 3) ** 0.5 + 1) / 2)
    depth = len({key.split(".")[1] for key in model if key.startswith("blocks.")})
    default_width, default_depth = {"beit_base_patch16_224": (768, 12), "beit_large_patch16_224": (1024, 24)}[backbone]
    read = {"embed_dim": width, "depth": depth, "patch_size": patch, "img_size": window * patch}
    defaults = {"embed_dim": default_width, "depth": default_depth, "patch_size": 16, "img_size": 224}
    sizes = {**kwargs, **{k: v for k, v in read.items() if v != defaults[k]}}
    hidden, out = (int(model[f"projectors.{i}.weight"].shape[0]) for i in (0, 6))
    module = ConMIMModule(backbone, sizes, proj_hidden_dim=hidden, proj_dim=out)
    state = {**_conmim_branch(model, "student"), **_conmim_branch((teacher or student)["model"], "teacher")}
    _load_exactly(module, state, f"{source}: its weights do not fill the ConMIM {arch} model")
    return module, arch


def _mmcv_name(key: str, kind: str) -> str | None:
    """An mmcv ViT (``kind="encoder"``), MAE decoder (``"decoder"``) or neck (``"neck"``) key as ours; None: unknown."""
    layers = {"encoder": "layers.", "decoder": "decoder_blocks.", "neck": None}[kind]
    if layers is not None and key.startswith(layers):
        index, _, rest = key[len(layers) :].partition(".")
        new = next((new + rest[len(old) :] for old, new in _MMCV_LAYER if rest.startswith(old)), None)
        return f"blocks.{index}.{new}" if index.isdigit() and new is not None else None
    return next((new + key[len(old) :] for old, new in _MMCV_TOP[kind] if key.startswith(old)), None)


def _cmae_state(state_dict: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """An official CMAE state dict (a whole model's, or the encoder's alone) under CMAEModule's names.

    Returns the renamed tensors and the decoders' fixed position tables (checked, not loaded).
    """
    whole = any(key.startswith("backbone.") for key in state_dict)
    renamed: dict[str, torch.Tensor] = {}
    tables: list[torch.Tensor] = []
    for key, value in state_dict.items():
        if not whole:
            old, new = "", "online_encoder.vit."
        else:
            prefix = next((p for p in _CMAE_PREFIXES if key.startswith(p[0])), None)
            if prefix is None:
                raise ValueError(
                    f"{source}: the CMAE key {key!r} belongs to no part of the model (expected the prefixes "
                    f"{', '.join(p for p, _ in _CMAE_PREFIXES)})"
                )
            old, new = prefix
        part = key[len(old) :]
        if part == "decoder_pos_embed":
            tables.append(value)
            continue
        kind = "decoder" if "decoder" in old else "neck" if old.endswith(("projector.", "predictor.")) else "encoder"
        name = _mmcv_name(part, kind)
        if name is None:
            raise ValueError(f"{source}: the CMAE {kind} key {key!r} has no place in lightning-mim's CMAE")
        renamed[new + name] = value
    return renamed, tables


def cmae_module(checkpoint: dict[str, Any], source: str = "CMAE checkpoint") -> tuple[CMAEModule, str, str]:
    """A :class:`~lightning_mim.CMAEModule` holding an official CMAE checkpoint's weights.

    Returns:
        The module, CMAE's arch name (``b``, ``l``, ``s``), and which parts the file held: ``"encoder"``
        (a released file: the rest is initialised as a new run's) or ``"all"``.

    Raises:
        ValueError: Not a CMAE pre-training checkpoint (a fine-tuned classifier, another format), an
            architecture outside CMAE's ``arch_zoo``, or weights that do not fill the model exactly.
    """
    from lightning_mim.methods.cmae import CMAEModule

    state_dict = checkpoint.get("state_dict")
    if detect_format(checkpoint) != "cmae" or not isinstance(state_dict, dict):
        raise ValueError(f"{source}: not an official CMAE checkpoint; it looks like {_describe(checkpoint)}")
    if any(str(key).startswith(("head.head.", "fc_norm.", "backbone.fc_norm.")) for key in state_dict):
        raise ValueError(
            f"{source}: a fine-tuned CMAE classifier (it has fc_norm / head.head); lightning-mim converts the "
            "pre-training weights (the 'PT' files of CMAE's README)"
        )
    state, tables = _cmae_state(state_dict, source)
    enc = "online_encoder.vit."
    width, mlp = int(state[f"{enc}cls_token"].shape[-1]), int(state[f"{enc}blocks.0.mlp.fc1.weight"].shape[0])
    if (width, mlp) not in CMAE_ARCHS:
        raise ValueError(
            f"{source}: a CMAE encoder of width {width} and MLP width {mlp}; lightning-mim converts CMAE's "
            f"arch_zoo {', '.join(f'{a} ({w}, {m})' for (w, m), (a, _, _) in CMAE_ARCHS.items())}"
        )
    arch, backbone, kwargs = CMAE_ARCHS[(width, mlp)]
    sizes = {**kwargs, **_vit_sizes(state, backbone, enc)}
    table = state[f"{enc}pos_embed"]
    grid = (round((int(table.shape[1]) - 1) ** 0.5),) * 2
    order = sincos_order_of(table, grid) or "rows_first"  # the decoders' tables follow the encoder's
    whole = any(key.startswith("pixel_decoder.") for key in state)
    parts: dict[str, Any] = {}
    if whole:
        parts = {
            "decoder_dim": int(state["pixel_decoder.embed.weight"].shape[0]),
            "decoder_depth": _count_blocks(state, "pixel_decoder.blocks."),
            "feature_decoder_depth": _count_blocks(state, "online_heads.feature_decoder.blocks."),
            "proj_hidden_dim": int(state["online_heads.projector.0.weight"].shape[0]),
            "proj_dim": int(state["online_heads.projector.3.weight"].shape[0]),
        }
    module = CMAEModule(backbone, sizes, pos_embed_order=order, **parts)
    for found in tables:
        ours = cast(torch.Tensor, module.pixel_decoder.pos_embed)  # (1, N, dim): without the CLS row
        if found.shape[-1] != ours.shape[-1] or not torch.allclose(found[:, -ours.shape[1] :].float(), ours, atol=1e-5):
            raise ValueError(f"{source}: a decoder_pos_embed is not CMAE's fixed sin-cos table of this grid")
    fresh: tuple[str, ...] = ()
    if not whole:  # the official run starts its target branch as a copy of the online one
        encoder = {k[len(enc) :]: v for k, v in state.items() if k.startswith(enc)}
        state.update({f"target_encoder.vit.{k}": v for k, v in encoder.items() if not k.startswith("norm.")})
        fresh = ("pixel_decoder.", "online_heads.", "target_projector.")
    _load_exactly(module, state, f"{source}: its weights do not fill the CMAE {arch} model", fresh)
    return module, arch, "all" if whole else "encoder"


def _load_official(src: str | Path) -> dict[str, Any]:
    """An official file with ``weights_only=True``, letting ``argparse.Namespace`` (MAE's ``args``) through."""
    path = Path(src).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: allowed for this load only
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch_load_weights(path)
        else:  # torch 2.4: the allow-list is process-wide; it holds this one class
            torch.serialization.add_safe_globals([argparse.Namespace])
            checkpoint = torch_load_weights(path)
    except ValueError as err:
        if "mmengine" not in str(err):
            raise
        raise ValueError(
            f"{err}. It is an mmengine training checkpoint (CMAE's Runner saves its log objects too). If you "
            "trust the file (reading those objects unpickles it, which can run code), extract its weights where "
            "mmengine is installed with CMAE's tools/extract_backbone_weights.py (the encoder) and convert that "
            "file; or save its 'state_dict' entry alone, for every part"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def convert(src: str | Path, dst: str | Path, format: str | None = None, teacher: str | Path | None = None) -> Path:
    """Writes the official checkpoint ``src`` as a lightning-mim checkpoint ``dst``; returns ``dst``.

    Args:
        src: The official file (read with ``weights_only=True``: nothing in it is unpickled but an
            ``argparse.Namespace``).
        dst: The checkpoint to write (atomically; its folder is created).
        format: One of ``OFFICIAL_FORMATS``; None detects it. A file of another format is refused,
            naming what it looks like.
        teacher: ConMIM only: the teacher copy (``checkpoint_copy-N.pth``) beside the student ``src``.
    """
    if format is not None and format not in OFFICIAL_FORMATS:
        raise ValueError(f"convert(format={format!r}): must be one of {', '.join(map(repr, OFFICIAL_FORMATS))}")
    checkpoint = _load_official(src)
    found = detect_format(checkpoint)
    if found is None or (format is not None and found != format):
        wanted = f"an official {format} checkpoint" if format else f"one of {', '.join(OFFICIAL_FORMATS)}"
        raise ValueError(f"{src}: not {wanted}; it looks like {_describe(checkpoint)}")
    origin: dict[str, Any] = {"format": found, "file": Path(src).name}
    module: pl.LightningModule
    if teacher is not None and found != "conmim":
        raise ValueError(f"convert(teacher={str(teacher)!r}): a teacher file goes with a ConMIM student, not {found}")
    if found == "mocov3":
        module = mocov3_module(checkpoint, str(src))
        origin["arch"] = str(checkpoint["arch"])
    elif found == "mae":
        module, origin["arch"], origin["decoder"] = mae_module(checkpoint, str(src))
    elif found == "cmae":
        module, origin["arch"], origin["parts"] = cmae_module(checkpoint, str(src))
    else:
        copy = _load_official(teacher) if teacher is not None else None
        module, origin["arch"] = conmim_module(checkpoint, copy, str(src))
        origin["teacher"] = Path(teacher).name if teacher is not None else "the student's weights"
    epoch = checkpoint.get("epoch", (checkpoint.get("meta") or {}).get("epoch"))  # mmengine: meta.epoch
    if isinstance(epoch, int):
        origin["epoch"] = epoch
    out: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(out)  # the lightning-mim entry: method, encoders, random streams
    out["lightning_mim"]["converted_from"] = origin
    dst = Path(dst)
    AtomicCheckpointIO().save_checkpoint(out, dst)
    return dst
