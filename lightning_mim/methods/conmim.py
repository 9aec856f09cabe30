"""ConMIM: masked image modeling with denoising contrast.

Yi et al., "Masked Image Modeling with Denoising Contrast", ICLR 2023, arXiv:2205.09616.
Defaults follow the official code (TencentARC/ConMIM).

The student sees a weakly augmented image with BEiT block masks (masked patch embeddings replaced by
a learned mask token); a momentum teacher sees a strongly augmented version of the same crop with no
mask. Every output token goes through a BatchNorm projector; for each masked patch the student
feature must pick out the teacher feature of the same patch among all patches of the same image
(intra-image InfoNCE, tau = 0.1).

Batch keys (uint8 images, normalised on the device):
    ``images``: (B, 3, H, W) the student ("weak") view.
    ``teacher_images``: (B, 3, H, W) the teacher ("strong") view of the same crop.
    ``labels``: optional, unused for training.
Validation batches need only ``images``.
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

from lightning_mim._rng import Stream
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.checkpoint.meta import EncoderSpec
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, ConMIMViews, EvalView, normalize
from lightning_mim.losses import patch_contrastive_loss
from lightning_mim.masking import BlockMasking, MaskGenerator
from lightning_mim.methods._parts import LossTerms, MaskDraws, checked_normalization, eval_views, pick_encoder
from lightning_mim.methods._state import (
    load_method_state,
    load_start_weights,
    record_hparams,
    restore_optim,
    save_method_state,
)
from lightning_mim.methods._validation import (
    check_choice,
    check_crop_scale,
    check_mask_count,
    check_mask_grid,
    check_momenta,
    check_positive,
)
from lightning_mim.methods.settings import CONMIM_BACKBONE_DEFAULTS, CONMIM_DECAY_RULE, CONMIM_OPTIM
from lightning_mim.nn import BNProjector, MaskedViT
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.fsdp import is_sharded, shard_networks
from lightning_mim.nn.init import init_beit_pretraining_
from lightning_mim.nn.timm_models import TimmArgs
from lightning_mim.optim import OptimConfig, configure_adamw
from lightning_mim.pictures import similarity_panels

__all__ = ["CONMIM_BACKBONE_DEFAULTS", "CONMIM_DECAY_RULE", "CONMIM_OPTIM", "ConMIMModule"]


class _Network(nn.Module):
    """Encoder + token projector: (B, C, H, W) -> projected patch tokens (B, N, out_dim)."""

    def __init__(self, encoder: MaskedViT, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens = self.encoder(images, mask)  # (B, 1 + N, D)
        # The projector runs on every token, CLS included, as in the official code (BatchNorm
        # statistics include it); the CLS output is then dropped.
        return self.encoder.patch_tokens(self.projector(tokens))  # (B, N, out_dim)

    def features(self, images: Tensor) -> Tensor:
        """Encoder tokens of unmasked images, before the projector: (B, 1 + N, D)."""
        return self.encoder(images)


class ConMIMModule(pl.LightningModule):
    """ConMIM pre-training (see the module docstring for the method and the batch keys).

    The EMA teacher update is installed automatically (``configure_callbacks`` returns an
    :class:`~lightning_mim.callbacks.EMATeacher` with ``momentum`` / ``final_momentum``).

    Args:
        backbone: timm ViT or BEiT name; ConMIM's backbone is ``beit_*`` with the defaults in
            ``CONMIM_BACKBONE_DEFAULTS`` (ViT-S: ``beit_base_patch16_224`` with ``embed_dim=384,
            num_heads=6``).
        backbone_kwargs: timm arguments merged over ``CONMIM_BACKBONE_DEFAULTS`` for ``beit_*``
            backbones (e.g. ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``).
        masking: Mask generator; default BEiT block masking of 75 of 196 patches with blocks of at
            least 16 patches, both scaled to the patch grid for other image or patch sizes.
        temperature: Softmax temperature of the patch contrast (official: 0.1).
        proj_hidden_dim: Projector hidden width (official: 4096).
        proj_dim: Projector output width (official: 256).
        proj_layers: Projector depth in linear layers (official: 3).
        momentum: EMA momentum at the first step (official: 0.996).
        final_momentum: EMA momentum at the last step, cosine schedule (official: 1.0).
        init: ``"official"``: BEiT's pre-training initialisation as the official code applies it to
            encoder and projector (:func:`~lightning_mim.nn.init.init_beit_pretraining_`: normal(0.02)
            truncated at +-1 std for every Linear, the patch embedding and the tokens, then the
            1/sqrt(2 l) rescaling); ``"timm"`` keeps timm's (and PyTorch's for the projector).
        optim: AdamW + warmup-cosine settings; default ``CONMIM_OPTIM``, the official code's (lr
            5e-4 absolute, betas (0.9, 0.98), wd 0.05 by ``CONMIM_DECAY_RULE``, 5 warmup epochs,
            min lr 1e-5). Fields not set in a config keep these values.
        compile: ``torch.compile`` the student and teacher encoders in place when training starts
            (checkpoints unchanged).
        grad_checkpointing: Recompute the trained encoder's blocks in the backward pass (activation
            checkpointing): much less activation memory for about a third more compute (ViT-L).
        eval_encoder: The encoder that ``embed`` monitors (kNN) and that ``export`` writes by default,
            so the figures watched in training are those of the exported encoder. Default: the EMA
            teacher, which the official fine-tuning starts from.
        crop_scale: Area range of the shared random resized crop (official: (0.08, 1)).
        mean: Normalisation mean (of images in [0, 1]).
        std: Normalisation std.
        weights: Start from the weights of a checkpoint of this method (a converted official one, from
            ``lightning-mim convert``, or one of ours): weights only, a new optimiser and schedule. The
            checkpoint's encoders must match this module's architecture. Not recorded in hparams (the
            checkpoints hold the weights; their ``started_from`` names the file).
    """

    def __init__(
        self,
        backbone: str = "beit_base_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        masking: MaskGenerator | None = None,
        temperature: float = 0.1,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        proj_layers: int = 3,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        init: Literal["official", "timm"] = "official",
        optim: OptimConfig = CONMIM_OPTIM,
        compile: bool = False,
        grad_checkpointing: bool = False,
        eval_encoder: Literal["student", "teacher"] = "teacher",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim, ignore=["masking", "weights"])
        owner = type(self).__name__
        check_choice(owner, ("student", "teacher"), eval_encoder=eval_encoder)
        check_choice(owner, ("official", "timm"), init=init)
        check_positive(
            owner, temperature=temperature, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, proj_layers=proj_layers
        )
        check_momenta(owner, momentum=momentum, final_momentum=final_momentum)
        self.mean, self.std = checked_normalization(owner, mean, std)
        self.crop_scale = check_crop_scale(owner, crop_scale)
        kwargs = dict(CONMIM_BACKBONE_DEFAULTS) if backbone.startswith("beit") else {}
        kwargs.update(backbone_kwargs or {})
        encoder = MaskedViT(backbone, mode="mask_token", names=TimmArgs(owner, "backbone", "backbone_kwargs"), **kwargs)
        self.masking = masking if masking is not None else BlockMasking.beit_default(encoder.grid_size)
        check_mask_grid(owner, self.masking, encoder.grid_size)
        check_mask_count(owner, self.masking)
        self.proj_hidden_dim, self.proj_dim, self.proj_layers = proj_hidden_dim, proj_dim, proj_layers
        # The heads come from the hook before the teacher is copied: a subclass changes both.
        self.student = _Network(encoder, self.build_projector(encoder.embed_dim))
        if init == "official":
            init_beit_pretraining_([self.student.encoder, self.student.projector], encoder.vit.blocks)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.temperature = temperature
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.use_compile = compile
        self.student.encoder.set_grad_checkpointing(grad_checkpointing)
        self.eval_encoder = eval_encoder
        self.image_size: int = int(encoder.vit.patch_embed.img_size[0])
        self._masks = MaskDraws(Stream.CONMIM_MASKS)
        load_start_weights(self, weights, "conmim")

    def build_projector(self, in_dim: int) -> nn.Module:
        """The token projector of student and teacher: (..., in_dim) -> (..., out_dim).

        Default: the official BatchNorm MLP (``proj_layers`` linear layers, ``proj_hidden_dim`` wide,
        ``proj_dim`` out). Override it in a subclass to try another head; the teacher gets a copy.
        """
        return BNProjector(in_dim, self.proj_hidden_dim, self.proj_dim, self.proj_layers)

    # ----------------------------------------------------------------------------------- parts
    def train_views(self) -> ConMIMViews:
        """Data-loader transform producing ``images`` and ``teacher_images``."""
        return ConMIMViews(size=self.image_size, scale=self.crop_scale)

    def eval_views(self) -> EvalView:
        """Data-loader transform for validation and kNN images."""
        return eval_views(self.image_size)

    def configure_callbacks(self) -> list[Callback]:
        return [EMATeacher("student", "teacher", momentum=self.momentum, final_momentum=self.final_momentum)]

    def configure_model(self) -> None:
        if self.device_mesh is not None and not is_sharded(self.student):  # ModelParallelStrategy: FSDP2
            shard_networks([self.student, self.teacher], self.device_mesh, forward_methods=["features"])
        if self.use_compile:
            compile_in_place(self.student.encoder, self.teacher.encoder)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        return configure_adamw(self, self.student, self.optim)

    def encoder(self, which: Literal["student", "teacher"] = "student") -> nn.Module:
        """The student's or the teacher's timm backbone (the official fine-tuning starts from the teacher)."""
        return self._masked_encoder(which).vit

    def _masked_encoder(self, which: str) -> MaskedViT:
        return pick_encoder(self, which, student=self.student.encoder, teacher=self.teacher.encoder)

    @property
    def default_export(self) -> str:
        """The encoder that ``export`` writes by default: the monitored one, ``eval_encoder``."""
        return self.eval_encoder

    def export_encoders(self) -> dict[str, EncoderSpec]:
        """What :func:`lightning_mim.export.to_timm` can write: the student's and the teacher's timm backbone."""
        return {
            which: EncoderSpec(enc.arch, enc.timm_kwargs, enc.vit)
            for which, enc in (
                ("student", self._masked_encoder("student")),
                ("teacher", self._masked_encoder("teacher")),
            )
        }

    # ---------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = normalize(batch["images"], self.mean, self.std)
        teacher_images = normalize(batch["teacher_images"], self.mean, self.std)
        mask = self._masks.training(self, self.masking, images.shape[0])  # (B, N)
        return self.compute_losses(images, teacher_images, mask).log(self)

    def compute_losses(self, images: Tensor, teacher_images: Tensor, mask: Tensor) -> LossTerms:
        """ConMIM's loss, the denoising patch contrast.

        Each masked patch's student feature must pick out its own teacher feature among all patches
        of the image.

        Args:
            images: Normalised student view (B, 3, H, W).
            teacher_images: Normalised teacher view of the same crop (B, 3, H, W).
            mask: (B, N) bool, True = masked for the student.
        """
        with torch.no_grad():
            # The official teacher stays in train mode: its BatchNorms use batch statistics.
            target = self.teacher(teacher_images)  # (B, N, d)
        prediction = self.student(images, mask)  # (B, N, d)
        return LossTerms({"loss": patch_contrastive_loss(prediction, target, mask, self.temperature)})

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = normalize(batch["images"], self.mean, self.std)
        mask = self._masks.validation(self, self.masking, images.shape[0], batch_idx)
        self.log("val/loss", self.compute_losses(images, images, mask).total, sync_dist=True)

    def diagnostics(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Panels for :class:`~lightning_mim.callbacks.VisualDiagnostics`: input, mask, similarity.

        The cosine similarity of each patch's student feature (masked input) to its teacher feature
        (full input).
        """
        x = normalize(images, self.mean, self.std)
        mask = self.masking(x.shape[0], device=self.device, generator=generator)
        student = self.student(x, mask)  # (B, N, d) projected patch features
        teacher = self.teacher(x)
        return similarity_panels(images, mask, student, teacher, self.student.encoder.grid_size)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled features of ``eval_encoder`` for uint8 images, as its timm export computes them: (B, D)."""
        network = self.student if self.eval_encoder == "student" else self.teacher
        return network.encoder.pool(network.features(normalize(images, self.mean, self.std)))

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_method_state(checkpoint, "conmim", self, {"mask_stream": self._masks})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_method_state(checkpoint, "conmim", {"mask_stream": self._masks})
        self.optim = restore_optim(self, self.optim, checkpoint)
