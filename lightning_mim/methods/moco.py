"""MoCo v3 for ViT: the contrastive teacher of MimCo's first stage.

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021,
arXiv:2104.02057.

Two augmented views of each image go through a ViT (frozen random patch projection, fixed sin-cos
position embedding), a 3-layer BatchNorm projector and a 2-layer predictor that, for ViTs, also ends
in a non-affine BatchNorm; a momentum copy of the encoder and projector embeds the other view. The
loss is symmetric InfoNCE over the global batch, scaled by 2 tau. Defaults follow the official code
(facebookresearch/moco-v3): its ViT-S has 12 heads, its initialisation is ``init_mocov3_vit_``,
every parameter is weight-decayed, and crops are resized bilinearly.

Batch keys (uint8 images, normalised on the device):
    ``images``: (B, 3, H, W) the first view.
    ``images_2``: (B, 3, H, W) the second view.
    ``labels``: optional, unused for training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from lightning_mim._rng import CountedStream
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.checkpoint.meta import EncoderSpec, read_meta, write_meta
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView, TwoCropViews, normalize
from lightning_mim.losses import info_nce
from lightning_mim.methods._validation import (
    check_contrastive_batch,
    check_momenta,
    check_normalization,
    check_positive,
)
from lightning_mim.nn import BNProjector, freeze_sincos_pos_embed
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.heads import sync_batchnorm_on_gpus
from lightning_mim.nn.init import init_mocov3_vit_
from lightning_mim.nn.timm_models import TOKEN_MODEL_FAMILIES, TimmArgs, create_timm_model, timm_family
from lightning_mim.optim import DECAY_ALL, OptimConfig, configure_adamw, optim_config, resumable_optim

__all__ = ["MOCOV3_OPTIM", "MOCOV3_VIT_HEADS", "MoCoV3Module"]

#: MoCo v3's ViT recipe: AdamW, lr 1.5e-4 per 256 images, wd 0.1 on every parameter (main_moco.py:
#: ``AdamW(model.parameters(), ...)``: biases, norms and the class token included), 40 warmup
#: epochs, cosine to 0.
MOCOV3_OPTIM = OptimConfig(
    lr=1.5e-4, base_batch_size=256, min_lr=0.0, weight_decay=0.1, decay_rule=DECAY_ALL, warmup_epochs=40
)

#: Attention heads of the official ViTs where timm's differ: MoCo v3's ``vit_small`` has 12 heads of
#: width 32, timm's ``vit_small_*`` 6 of width 64. Applied unless ``backbone_kwargs`` sets ``num_heads``.
MOCOV3_VIT_HEADS = {"vit_small_": 12}


def mocov3_backbone_kwargs(backbone: str, backbone_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """timm arguments of MoCo v3's encoder: the official head count for ``vit_small_*`` unless given."""
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": "token"}
    for prefix, heads in MOCOV3_VIT_HEADS.items():
        if backbone.startswith(prefix):
            kwargs["num_heads"] = heads
    return {**kwargs, **(backbone_kwargs or {})}


_STEP_STREAM = 0x5354  # seeds the global generators at each training step ("ST")


class _Branch(nn.Module):
    """Encoder + projector: images -> (B, proj_dim) from the CLS token after the final norm."""

    def __init__(self, encoder: nn.Module, projector: BNProjector) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, images: Tensor) -> Tensor:
        return self.projector(self.encoder(images))


class MoCoV3Module(pl.LightningModule):
    """MoCo v3 pre-training of a timm ViT (see the module docstring for the method and batch keys).

    The momentum update of the momentum encoder and projector is installed automatically (cosine
    schedule from ``momentum`` to ``final_momentum``).

    Args:
        backbone: timm ViT name; its CLS token after the final norm is the image feature.
            ``vit_small_*`` is built with MoCo v3's 12 heads (``MOCOV3_VIT_HEADS``).
        backbone_kwargs: timm arguments (e.g. ``img_size``, ``patch_size``, ``embed_dim``,
            ``num_heads``: 6 gives timm's ViT-S).
        proj_hidden_dim: Projector and predictor hidden width (MoCo v3: 4096).
        proj_dim: Output width (MoCo v3: 256).
        temperature: InfoNCE temperature (MoCo v3 ViT: 0.2); each term is scaled by 2 tau.
        momentum: Momentum at the first step (MoCo v3: 0.99).
        final_momentum: Momentum at the last step (MoCo v3: 1.0, cosine).
        freeze_patch_projection: Keep the random patch projection fixed (MoCo v3's stability trick).
        fixed_pos_embed: Use the fixed 2-D sin-cos position embedding (MoCo v3's ViT does).
        sync_batchnorm: Synchronise the heads' BatchNorm statistics across GPUs (MoCo v3 does).
        init: ``"official"``: MoCo v3's ViT initialisation (:func:`~lightning_mim.nn.init.init_mocov3_vit_`:
            xavier-uniform Linears with qkv as three blocks, patch projection uniform(+-sqrt(6 /
            (3 p^2 + D))), class token normal(1e-6)); ``"timm"`` keeps timm's.
        optim: AdamW + warmup-cosine settings; default ``MOCOV3_OPTIM`` (weight decay on every parameter).
        compile: ``torch.compile`` the base and momentum encoders in place when training starts
            (checkpoints unchanged).
        grad_checkpointing: Recompute the trained encoder's blocks in the backward pass (activation
            checkpointing): much less activation memory for about a third more compute (ViT-L).
        mean: Normalisation mean (of images in [0, 1]).
        std: Normalisation std.
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        temperature: float = 0.2,
        momentum: float = 0.99,
        final_momentum: float = 1.0,
        freeze_patch_projection: bool = True,
        fixed_pos_embed: bool = True,
        sync_batchnorm: bool = True,
        init: Literal["official", "timm"] = "official",
        optim: OptimConfig = MOCOV3_OPTIM,
        compile: bool = False,
        grad_checkpointing: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self._step_stream = CountedStream(_STEP_STREAM)
        self.save_hyperparameters(ignore=["optim"])
        optim = optim_config(optim)
        self.hparams["optim"] = dataclasses.asdict(optim)  # plain types: checkpoints load with weights_only
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        owner = type(self).__name__
        if init not in ("official", "timm"):
            raise ValueError(f"{owner}(init={init!r}): must be 'official' or 'timm'")
        check_positive(owner, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim)
        check_momenta(owner, momentum=momentum, final_momentum=final_momentum)
        check_normalization(owner, mean, std)
        names = TimmArgs(owner, "backbone", "backbone_kwargs")
        family = timm_family(backbone, names)
        if family not in TOKEN_MODEL_FAMILIES:
            raise TypeError(f"{owner}(backbone={backbone!r}): a {family} model; MoCo v3 here trains a timm ViT or BEiT")
        kwargs = mocov3_backbone_kwargs(backbone, backbone_kwargs)
        encoder: Any = create_timm_model(backbone, names, **kwargs)
        self._encoder_spec = (backbone, kwargs)
        if init == "official":
            init_mocov3_vit_(encoder)
        if freeze_patch_projection:
            encoder.patch_embed.requires_grad_(False)
        if fixed_pos_embed and getattr(encoder, "pos_embed", None) is not None:
            freeze_sincos_pos_embed(encoder.pos_embed, tuple(encoder.patch_embed.grid_size), order="rows_first")
        width = int(encoder.num_features)
        # The heads keep PyTorch's default initialisation, as in the official code (built after the ViT's).
        self.base = _Branch(encoder, BNProjector(width, proj_hidden_dim, proj_dim, num_layers=3))
        # MoCo v3's ViT predictor ends in a non-affine BatchNorm (_build_mlp's default last_bn=True).
        self.predictor = BNProjector(proj_dim, proj_hidden_dim, proj_dim, num_layers=2, last_bn=True)
        self.momentum_branch = copy.deepcopy(self.base).requires_grad_(False)
        self.temperature = temperature
        self.sync_batchnorm = sync_batchnorm
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.optim = optim
        self.use_compile = compile
        encoder.set_grad_checkpointing(grad_checkpointing)  # the base encoder (the momentum copy is no-grad)
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = int(encoder.patch_embed.img_size[0])

    # ----------------------------------------------------------------------------------- parts
    @property
    def encoder(self) -> nn.Module:
        """The base encoder (a timm ViT): what MimCo uses as its teacher and what gets exported."""
        return self.base.encoder

    @property
    def projector(self) -> nn.Module:
        return self.base.projector

    def train_views(self) -> TwoCropViews:
        """Data-loader transform producing ``images`` and ``images_2`` (bilinear crops, as the official code)."""
        return TwoCropViews(size=self.image_size, interpolation="bilinear")

    def eval_views(self) -> EvalView:
        """Data-loader transform for validation and kNN images."""
        return EvalView(size=self.image_size, crop_fraction=0.875 if self.image_size >= 64 else 1.0)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The base encoder + projector and their momentum copies (not the predictor)."""
        return [(self.base, self.momentum_branch)]

    def configure_callbacks(self) -> list[Callback]:
        return [EMATeacher(momentum=self.momentum, final_momentum=self.final_momentum)]

    def setup(self, stage: str) -> None:
        if self.sync_batchnorm:
            self.base = sync_batchnorm_on_gpus(self.trainer, self.base)
            self.predictor = sync_batchnorm_on_gpus(self.trainer, self.predictor)
            self.momentum_branch = sync_batchnorm_on_gpus(self.trainer, self.momentum_branch)

    def on_train_start(self) -> None:
        # the per-device batch is known only once the loader is built
        check_contrastive_batch(self, "MoCo v3's contrastive loss")

    def configure_model(self) -> None:
        if self.use_compile:
            compile_in_place(self.base.encoder, self.momentum_branch.encoder)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        trainable = nn.ModuleDict({"base": self.base, "predictor": self.predictor})
        return configure_adamw(self, trainable, self.optim)

    # ---------------------------------------------------------------------------------- steps
    def _contrast(self, query: Tensor, key: Tensor) -> Tensor:
        return 2 * self.temperature * info_nce(query, key, self.temperature)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._step_stream.seed_global(self.global_rank, advance=True)  # resumable global randomness
        x1 = normalize(batch["images"], self.mean, self.std)
        x2 = normalize(batch["images_2"], self.mean, self.std)
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))  # (B, proj_dim)
        with torch.no_grad():
            k1, k2 = self.momentum_branch(x1), self.momentum_branch(x2)
        loss = self._contrast(q1, k2) + self._contrast(q2, k1)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # No second view at validation: the loss of an image against its own momentum embedding.
        x = normalize(batch["images"], self.mean, self.std)
        self.log("val/loss", self._contrast(self.predictor(self.base(x)), self.momentum_branch(x)), sync_dist=True)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """CLS features of the base encoder for uint8 images: (B, D)."""
        return self.encoder(normalize(images, self.mean, self.std))

    # --------------------------------------------------------------------------- checkpoints
    default_export = "student"

    def export_encoders(self) -> dict[str, EncoderSpec]:
        """What :func:`lightning_mim.export.to_timm` can write: the base and the momentum encoder."""
        arch, kwargs = self._encoder_spec
        return {
            "student": EncoderSpec(arch, kwargs, self.base.encoder),
            "teacher": EncoderSpec(arch, kwargs, self.momentum_branch.encoder),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_meta(checkpoint, "mocov3", module=self, step_stream=self._step_stream.state_dict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = read_meta(checkpoint, "mocov3")
        check_encoder_args(checkpoint, self._encoder_spec, type(self).__name__)
        if "step_stream" in meta:  # absent from checkpoints of version 0.1
            self._step_stream.load_state_dict(meta["step_stream"])
        self.optim = resumable_optim(self.optim, checkpoint, type(self).__name__)
        self.hparams["optim"] = dataclasses.asdict(self.optim)
        add_predictor_bn_statistics(checkpoint["state_dict"], self.predictor, "predictor.")


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
