"""MimCo: masked image modeling with a frozen contrastive teacher (stage 2).

Zhou et al., "MimCo: Masked Image Modeling Pre-training with Contrastive Teacher", ACM MM 2022,
arXiv:2209.03063. No official code is public: every value the paper does not give is an argument
documented as our default (marked DEFAULT).

A MIM student (mask tokens, all tokens encoded) learns two contrastive reconstructions against a
frozen contrastive teacher (stage 1, e.g. :class:`~lightning_mim.MoCoV3Module`) that sees the same
crop unmasked: patch level (each masked patch must pick out the teacher's feature of the same patch
among the patches of its image) and image level (the student's projected CLS must match the
teacher's projected CLS among the whole global batch).

Batch keys (uint8 images, normalised on the device):
    ``images``: (B, 3, H, W) the crop seen by both student (masked) and teacher (unmasked).
    ``labels``: optional, unused for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from lightning_mim._rng import Stream
from lightning_mim.checkpoint.meta import EncoderSpec
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView, MAEViews, normalize
from lightning_mim.losses import info_nce, patch_contrastive_loss
from lightning_mim.masking import MaskGenerator, RandomMasking
from lightning_mim.methods._parts import LossTerms, MaskDraws, checked_normalization, eval_views, pick_encoder
from lightning_mim.methods._state import (
    load_method_state,
    load_start_weights,
    record_hparams,
    restore_optim,
    save_method_state,
)
from lightning_mim.methods._validation import (
    check_contrastive_batch,
    check_mask_count,
    check_mask_grid,
    check_non_negative,
    check_positive,
)
from lightning_mim.methods.settings import MIMCO_MASK_RATIO, MIMCO_OPTIM
from lightning_mim.methods.teachers import (
    build_mimco_teacher,
    check_teacher_grid,
    load_mocov3_teacher,
    projector_out_dim,
)
from lightning_mim.nn import BNProjector, MaskedViT
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.timm_models import TimmArgs
from lightning_mim.optim import OptimConfig, configure_adamw
from lightning_mim.pictures import similarity_panels

__all__ = ["MIMCO_MASK_RATIO", "MIMCO_OPTIM", "MimCoModule", "load_mocov3_teacher"]


class MimCoModule(pl.LightningModule):
    """MimCo stage 2 (see the module docstring for the method and the batch keys).

    The teacher is frozen: eval mode, no gradients, not in the optimizer, no EMA. It comes from
    ``teacher_ckpt`` (a :class:`~lightning_mim.MoCoV3Module` checkpoint: its encoder and projector),
    or ``teacher_arch`` + ``teacher_weights`` (a timm model with local weights and no projector, so
    ``image_target="cls"``), or, for smoke tests only, a random MoCo v3 ViT of the student's size
    (``allow_random_teacher``).

    Args:
        backbone: timm ViT name of the student (the teacher's size).
        backbone_kwargs: timm arguments; DEFAULT layer scale 0.1 and drop path 0.1.
        teacher_ckpt: Stage-1 checkpoint path.
        teacher_arch: timm name of a teacher with local weights (instead of ``teacher_ckpt``).
        teacher_weights: Local weights file (.safetensors / .pth) for ``teacher_arch``.
        teacher_kwargs: timm arguments for ``teacher_arch``.
        allow_random_teacher: Allow a randomly initialised teacher (smoke runs and tests only).
        masking: Mask generator; DEFAULT random masking at ``mask_ratio`` (the paper's "simple random
            masking strategy"); ``BlockMasking.beit_default(grid)`` gives BEiT's block masking.
        mask_ratio: Ratio of the default random masking (DEFAULT ``MIMCO_MASK_RATIO`` = 0.75: the
            paper ablates the ratio; its chosen value is not confirmed here).
        patch_hidden_dim: Patch head hidden width (DEFAULT 2048).
        proj_hidden_dim: Image head hidden width (DEFAULT MoCo v3's 4096).
        image_proj_layers: Linear layers of the image head's projector on the student's CLS token
            (DEFAULT 3, MoCo v3's projector: BatchNorm after each, non-affine at the end).
        image_pred_layers: Linear layers of the image head's predictor after the projector (DEFAULT
            2, MoCo v3's ViT predictor, ending in a non-affine BatchNorm); 0 for none.
        image_target: The image-level target: ``"projector"`` (DEFAULT: the teacher's projector on its
            CLS token, MoCo v3's embedding space; needs a stage-1 teacher) or ``"cls"`` (the teacher's
            CLS feature after its final norm).
        patch_temperature: tau_p of the patch-level InfoNCE (DEFAULT 0.2).
        image_temperature: tau_i of the image-level InfoNCE (DEFAULT 0.2), scaled by 2 tau_i.
        image_weight: lambda, weight of the image-level loss (DEFAULT 1).
        teacher_bf16: Run the teacher under bf16 autocast (no gradients either way).
        optim: AdamW + warmup-cosine settings; default ``MIMCO_OPTIM``.
        compile: ``torch.compile`` the student and the teacher in place when training starts
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
        teacher_ckpt: str | None = None,
        teacher_arch: str | None = None,
        teacher_weights: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        allow_random_teacher: bool = False,
        masking: MaskGenerator | None = None,
        mask_ratio: float = MIMCO_MASK_RATIO,
        patch_hidden_dim: int = 2048,
        proj_hidden_dim: int = 4096,
        image_proj_layers: int = 3,
        image_pred_layers: int = 2,
        image_target: Literal["projector", "cls"] = "projector",
        patch_temperature: float = 0.2,
        image_temperature: float = 0.2,
        image_weight: float = 1.0,
        teacher_bf16: bool = True,
        optim: OptimConfig = MIMCO_OPTIM,
        compile: bool = False,
        grad_checkpointing: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim, ignore=["masking", "weights"])
        owner = type(self).__name__
        check_positive(owner, patch_temperature=patch_temperature, image_temperature=image_temperature)
        check_positive(owner, patch_hidden_dim=patch_hidden_dim, proj_hidden_dim=proj_hidden_dim)
        check_positive(owner, image_proj_layers=image_proj_layers)
        check_non_negative(owner, image_weight=image_weight, image_pred_layers=image_pred_layers)
        if image_target not in ("projector", "cls"):
            raise ValueError(f"{owner}(image_target={image_target!r}): must be 'projector' or 'cls'")
        self.mean, self.std = checked_normalization(owner, mean, std)
        student_kwargs = {"init_values": 0.1, "drop_path_rate": 0.1, **(backbone_kwargs or {})}
        self.student = MaskedViT(
            backbone, mode="mask_token", names=TimmArgs(owner, "backbone", "backbone_kwargs"), **student_kwargs
        )
        teacher, self.teacher_projector = build_mimco_teacher(
            backbone, backbone_kwargs, teacher_ckpt, teacher_arch, teacher_weights, teacher_kwargs, allow_random_teacher
        )
        self.teacher: Any = teacher  # a timm ViT: forward_features and num_features are used
        check_teacher_grid(owner, self.teacher, self.student)
        teacher_width = int(teacher.num_features)  # type: ignore[arg-type]
        if image_target == "projector" and self.teacher_projector is None:
            raise ValueError(
                f"{owner}(image_target='projector'): the teacher from teacher_arch {teacher_arch!r} has no "
                "projector; set image_target='cls' (its CLS feature) or give a stage-1 teacher_ckpt"
            )
        if image_target == "cls":
            self.teacher_projector = None
        self.image_target = image_target
        target_dim = teacher_width if self.teacher_projector is None else projector_out_dim(self.teacher_projector)
        width, grid = self.student.embed_dim, self.student.grid_size
        self.masking = RandomMasking(grid, mask_ratio) if masking is None else masking  # DEFAULT: random
        check_mask_grid(owner, self.masking, grid)
        check_mask_count(owner, self.masking)
        self.patch_hidden_dim, self.proj_hidden_dim = patch_hidden_dim, proj_hidden_dim
        self.image_proj_layers, self.image_pred_layers = image_proj_layers, image_pred_layers
        self.patch_head = self.build_patch_head(width, teacher_width)
        self.image_head = self.build_image_head(width, target_dim)
        self.patch_temperature, self.image_temperature = patch_temperature, image_temperature
        self.image_weight = image_weight
        self.teacher_bf16 = teacher_bf16
        self.use_compile = compile
        self.student.set_grad_checkpointing(grad_checkpointing)
        self.image_size = int(self.student.vit.patch_embed.img_size[0])
        self._masks = MaskDraws(Stream.MIMCO_MASKS)
        load_start_weights(self, weights, "mimco")

    def build_patch_head(self, in_dim: int, out_dim: int) -> nn.Module:
        """Student patch tokens (..., in_dim) -> teacher patch features (..., out_dim): DEFAULT LayerNorm + MLP."""
        hidden = self.patch_hidden_dim
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def build_image_head(self, in_dim: int, out_dim: int) -> nn.Module:
        """Student CLS token (B, in_dim) -> image target (B, out_dim).

        DEFAULT: MoCo v3's ViT heads, projector then predictor (both ending in a non-affine BatchNorm).
        """
        heads: list[nn.Module] = [BNProjector(in_dim, self.proj_hidden_dim, out_dim, num_layers=self.image_proj_layers)]
        if self.image_pred_layers:
            heads.append(BNProjector(out_dim, self.proj_hidden_dim, out_dim, num_layers=self.image_pred_layers))
        return nn.Sequential(*heads)

    # ----------------------------------------------------------------------------------- parts
    def train(self, mode: bool = True) -> MimCoModule:
        """Train mode for the student only: the teacher stays in eval mode."""
        super().train(mode)
        for frozen in (self.teacher, self.teacher_projector or nn.Identity()):
            frozen.eval()
        return self

    def encoder(self, which: Literal["student"] = "student") -> nn.Module:
        """The student's timm backbone (the teacher is stage 1's MoCo v3 encoder, frozen)."""
        return pick_encoder(self, which, student=self.student.vit)

    def train_views(self) -> MAEViews:
        """DEFAULT view: random resized crop (scale (0.2, 1)) + flip, shared by student and teacher."""
        return MAEViews(size=self.image_size)

    def eval_views(self) -> EvalView:
        return eval_views(self.image_size)

    def configure_model(self) -> None:
        if self.use_compile:
            compile_in_place(self.student, self.teacher)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        parts = {"student": self.student, "patch_head": self.patch_head, "image_head": self.image_head}
        return configure_adamw(self, nn.ModuleDict(parts), self.optim)

    def on_train_start(self) -> None:
        if self.image_weight > 0:  # the per-device batch is known only once the loader is built
            check_contrastive_batch(self, "the image-level loss")

    # ---------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def _teacher_targets(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher patch tokens (B, N, Dt) after the final norm and the image target (B, d), once per step."""
        enabled = self.teacher_bf16 and images.device.type in ("cuda", "cpu")
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=enabled):
            tokens = self.teacher.forward_features(images)  # (B, P + N, Dt)
        tokens = tokens.float()
        prefix = int(getattr(self.teacher, "num_prefix_tokens", 1))
        cls = tokens[:, 0]
        image_target = self.teacher_projector(cls) if self.teacher_projector is not None else cls
        return tokens[:, prefix:], image_target

    def compute_losses(self, images: Tensor, mask: Tensor) -> LossTerms:
        """MimCo's terms: patch-level and image-level contrast with the frozen teacher.

        ``loss_patch``: each masked patch's prediction against the teacher's patch features of the same
        image; ``loss_image``: the student's CLS embedding against the teacher's image target over the
        global batch.

        Args:
            images: Normalised images (B, 3, H, W), the same view for student and teacher.
            mask: (B, N) bool, True = masked for the student.
        """
        patch_target, image_target = self._teacher_targets(images)
        tokens = self.student(images, mask)  # (B, 1 + N, D)
        patch_pred = self.patch_head(self.student.patch_tokens(tokens))  # (B, N, Dt)
        loss_patch = patch_contrastive_loss(patch_pred, patch_target, mask, self.patch_temperature)
        query = self.image_head(tokens[:, 0])  # (B, d)
        loss_image = 2 * self.image_temperature * info_nce(query, image_target, self.image_temperature)
        return LossTerms({"loss_patch": loss_patch, "loss_image": loss_image}, {"loss_image": self.image_weight})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = normalize(batch["images"], self.mean, self.std)
        mask = self._masks.training(self, self.masking, images.shape[0])  # (B, N)
        return self.compute_losses(images, mask).log(self)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = normalize(batch["images"], self.mean, self.std)
        mask = self._masks.validation(self, self.masking, images.shape[0], batch_idx)
        self.log("val/loss", self.compute_losses(images, mask).total, sync_dist=True)

    def diagnostics(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Panels for :class:`~lightning_mim.callbacks.VisualDiagnostics`: input, mask, similarity.

        The cosine similarity of each patch's predicted feature (masked student) to the frozen
        teacher's.
        """
        x = normalize(images, self.mean, self.std)
        mask = self.masking(x.shape[0], device=self.device, generator=generator)
        teacher, _ = self._teacher_targets(x)  # (B, N, Dt)
        student = self.patch_head(self.student.patch_tokens(self.student(x, mask)))  # (B, N, Dt)
        return similarity_panels(images, mask, student, teacher, self.student.grid_size)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled features of the student for uint8 images, as its timm export computes them: (B, D)."""
        return self.student.pool(self.student(normalize(images, self.mean, self.std)))

    # --------------------------------------------------------------------------- checkpoints
    default_export = "student"

    def export_encoders(self) -> dict[str, EncoderSpec]:
        """What :func:`lightning_mim.export.to_timm` can write: the student (the teacher is stage 1's)."""
        return {"student": EncoderSpec(self.student.arch, self.student.timm_kwargs, self.student.vit)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_method_state(checkpoint, "mimco", self, {"mask_stream": self._masks})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_method_state(checkpoint, "mimco", {"mask_stream": self._masks})
        self.optim = restore_optim(self, self.optim, checkpoint)
