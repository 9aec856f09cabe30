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
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from lightning_mim._rng import CountedStream, Stream
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.checkpoint.meta import EncoderSpec
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView, TwoCropViews, normalize
from lightning_mim.losses import info_nce
from lightning_mim.methods._parts import (
    LossTerms,
    checked_normalization,
    eval_views,
    pick_encoder,
    sync_batchnorm_on_gpus,
)
from lightning_mim.methods._state import (
    load_method_state,
    load_start_weights,
    record_hparams,
    restore_optim,
    save_method_state,
)
from lightning_mim.methods._validation import check_choice, check_contrastive_batch, check_momenta, check_positive
from lightning_mim.methods.settings import MOCOV3_OPTIM, MOCOV3_VIT_HEADS
from lightning_mim.methods.teachers import add_predictor_bn_statistics, check_encoder_args, mocov3_backbone_kwargs
from lightning_mim.nn import BNProjector, freeze_sincos_pos_embed
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.init import init_mocov3_vit_
from lightning_mim.nn.timm_models import TOKEN_MODEL_FAMILIES, TimmArgs, create_timm_model, timm_family
from lightning_mim.optim import OptimConfig, configure_adamw

__all__ = ["MOCOV3_OPTIM", "MOCOV3_VIT_HEADS", "MoCoV3Module"]


class _Branch(nn.Module):
    """Encoder + projector: images -> (B, proj_dim) from the CLS token after the final norm."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
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
        weights: Start from the weights of a checkpoint of this method (a converted official one, from
            ``lightning-mim convert``, or one of ours): weights only, a new optimiser and schedule. The
            checkpoint's encoders must match this module's architecture. Not recorded in hparams (the
            checkpoints hold the weights; their ``started_from`` names the file).
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
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim, ignore=["weights"])
        owner = type(self).__name__
        check_choice(owner, ("official", "timm"), init=init)
        check_positive(owner, temperature=temperature, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim)
        check_momenta(owner, momentum=momentum, final_momentum=final_momentum)
        self.mean, self.std = checked_normalization(owner, mean, std)
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
        self.proj_hidden_dim, self.proj_dim = proj_hidden_dim, proj_dim
        # The heads come from the hooks, before the momentum branch is copied: a subclass changes both.
        # They keep PyTorch's default initialisation, as in the official code (built after the ViT's).
        self.base = _Branch(encoder, self.build_projector(int(encoder.num_features)))
        self.predictor = self.build_predictor(proj_dim)
        self.momentum_branch = copy.deepcopy(self.base).requires_grad_(False)
        self.temperature = temperature
        self.sync_batchnorm = sync_batchnorm
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.use_compile = compile
        encoder.set_grad_checkpointing(grad_checkpointing)  # the base encoder (the momentum copy is no-grad)
        self.image_size = int(encoder.patch_embed.img_size[0])
        self._step_stream = CountedStream(Stream.STEPS)
        load_start_weights(self, weights, "mocov3")

    def build_projector(self, in_dim: int) -> nn.Module:
        """The projector of both branches (the momentum branch gets a copy): MoCo v3's 3-layer BatchNorm MLP."""
        return BNProjector(in_dim, self.proj_hidden_dim, self.proj_dim, num_layers=3)

    def build_predictor(self, in_dim: int) -> nn.Module:
        """The base branch's predictor.

        MoCo v3's ViT predictor: 2 layers ending in a non-affine BatchNorm (``_build_mlp``'s default
        ``last_bn=True``).
        """
        return BNProjector(in_dim, self.proj_hidden_dim, self.proj_dim, num_layers=2, last_bn=True)

    # ----------------------------------------------------------------------------------- parts
    def encoder(self, which: Literal["student", "teacher"] = "student") -> nn.Module:
        """The base (``"student"``) or momentum (``"teacher"``) encoder, a timm ViT; MimCo's teacher is the base one."""
        return pick_encoder(self, which, student=self.base.encoder, teacher=self.momentum_branch.encoder)

    @property
    def projector(self) -> nn.Module:
        """The base branch's projector (MimCo's image target)."""
        return self.base.projector

    def train_views(self) -> TwoCropViews:
        """Data-loader transform producing ``images`` and ``images_2`` (bilinear crops, as the official code)."""
        return TwoCropViews(size=self.image_size, interpolation="bilinear")

    def eval_views(self) -> EvalView:
        """Data-loader transform for validation and kNN images."""
        return eval_views(self.image_size)

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
    def compute_losses(self, images: Tensor, images_2: Tensor) -> LossTerms:
        """MoCo v3's symmetric contrastive loss.

        Each view's prediction against the momentum embedding of the other view (InfoNCE over the
        global batch, each term scaled by 2 tau).

        Args:
            images: Normalised first views (B, 3, H, W).
            images_2: Normalised second views (B, 3, H, W).
        """
        q1, q2 = self.predictor(self.base(images)), self.predictor(self.base(images_2))  # (B, proj_dim)
        with torch.no_grad():
            k1, k2 = self.momentum_branch(images), self.momentum_branch(images_2)
        return LossTerms({"loss": self._contrast(q1, k2) + self._contrast(q2, k1)})

    def _contrast(self, query: Tensor, key: Tensor) -> Tensor:
        return 2 * self.temperature * info_nce(query, key, self.temperature)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._step_stream.seed_global(self.global_rank, advance=True)  # resumable global randomness
        x1 = normalize(batch["images"], self.mean, self.std)
        x2 = normalize(batch["images_2"], self.mean, self.std)
        return self.compute_losses(x1, x2).log(self)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # No second view at validation: the loss of an image against its own momentum embedding.
        x = normalize(batch["images"], self.mean, self.std)
        self.log("val/loss", self._contrast(self.predictor(self.base(x)), self.momentum_branch(x)), sync_dist=True)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """CLS features of the base encoder for uint8 images: (B, D)."""
        return self.encoder()(normalize(images, self.mean, self.std))

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
        save_method_state(checkpoint, "mocov3", self, {"step_stream": self._step_stream})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # "step_stream" is absent from checkpoints of version 0.1
        load_method_state(checkpoint, "mocov3", {"step_stream": self._step_stream}, optional=["step_stream"])
        check_encoder_args(checkpoint, self._encoder_spec, type(self).__name__)
        self.optim = restore_optim(self, self.optim, checkpoint)
        add_predictor_bn_statistics(checkpoint["state_dict"], self.predictor, "predictor.")
