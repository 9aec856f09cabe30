"""CIM: corrupted image modeling.

Fang et al., "Corrupted Image Modeling for Self-Supervised Visual Pre-Training", arXiv:2202.03382.
No official code is public; values marked "chosen default" below are ours.

A small BEiT generator sees the image with ~50% of its patches masked (blocks) and predicts the
visual tokens that a frozen tokenizer assigns to it. Masked positions are replaced by tokens
*sampled* from its output; the tokenizer decodes the token map into a corrupted image. The enhancer
(a ViT or a ResNet) sees only the corrupted image and learns either to restore every original pixel,
as sliding-window normalised targets (ResPix), or to tell for every token whether it was replaced
(RevDet). Generator and enhancer train together with ``L = L_G + weight * L_E``; nothing flows from
the enhancer back to the generator (sampling and the frozen decoder stop it). After pre-training
only the enhancer is kept.

Batch keys (uint8 images): ``images`` (B, 3, H, W) at the enhancer's input size; ``labels``
optional, unused. The tokenizer's input (the same crop at ``grid * downsample`` px, 112 for a
14x14 grid) is resized from it on the device. Validation batches need only ``images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from lightning_mim._rng import CountedStream, Stream, make_generator
from lightning_mim.checkpoint.meta import EncoderSpec
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView, MAEViews, normalize
from lightning_mim.losses import window_normalize
from lightning_mim.masking import BlockMasking, MaskGenerator
from lightning_mim.methods._parts import LossTerms, MaskDraws, checked_normalization, eval_views, pick_encoder
from lightning_mim.methods._state import load_method_state, load_start_weights, record_hparams, save_method_state
from lightning_mim.methods._validation import check_mask_count, check_mask_grid, check_non_negative, check_positive
from lightning_mim.methods.settings import CIM_OPTIM
from lightning_mim.methods.tokenizer import frozen_tokenizer
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.enhancer import Enhancer, Objective
from lightning_mim.nn.generator import TokenGenerator, sample_tokens
from lightning_mim.nn.timm_models import TimmArgs, timm_family
from lightning_mim.nn.tokenizer import ImageTokenizer
from lightning_mim.optim import OptimConfig, configure_adamw
from lightning_mim.pictures import cim_panels

__all__ = ["CIM_OPTIM", "CIMModule", "sample_tokens"]


class CIMModule(pl.LightningModule):
    """CIM pre-training (see the module docstring for the method and the batch keys).

    The tokenizer is frozen throughout: eval mode, no gradients, not in the optimizer. It comes
    from ``tokenizer_ckpt`` (a :class:`~lightning_mim.VQTokenizerModule` checkpoint), from a
    ``tokenizer`` object (e.g. :class:`~lightning_mim.nn.DALLETokenizer`, the paper's dVAE, from
    local files), or, for smoke runs only, a randomly initialised :class:`VQTokenizer`
    (``allow_random_tokenizer``).

    Args:
        enhancer: timm name of the enhancer: a ViT (``vit_base_patch16_224``) or ``resnet50``.
        enhancer_kwargs: timm arguments; ViTs get the chosen defaults drop path 0.1 and layer
            scale 0.1 (spec) unless given.
        objective: ``"respix"`` (restore pixels) or ``"revdet"`` (detect replaced tokens).
        image_size: Enhancer input side; ViTs read it from their ``img_size`` when None, ResNets
            default to 224.
        tokenizer_ckpt: Stage-0 checkpoint path.
        tokenizer: A ready :class:`ImageTokenizer` (instead of ``tokenizer_ckpt``).
        allow_random_tokenizer: Use a random VQ tokenizer when none is given (smoke runs only).
        generator: timm BEiT name of the generator.
        generator_kwargs: timm arguments of the generator; chosen defaults depth 4, the enhancer's
            width (768 for a ResNet enhancer), width / 64 heads, the token grid's patch size.
        masking: Mask generator over the token grid; chosen default BEiT blocks over ~50% of it.
        temperature: Sampling temperature (chosen default 1).
        enhancer_weight: Weight of the enhancer loss (chosen default 1).
        window: ResPix normalisation window (chosen default 8; the paper's window is not confirmed here).
        clip_grad_norm: If set, clip the gradient norm of the generator and of the enhancer
            separately to this value (the spec clips per network).
        optim: AdamW + warmup-cosine settings; default ``CIM_OPTIM``.
        compile: ``torch.compile`` the generator and enhancer backbones in place when training starts
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
        enhancer: str = "vit_base_patch16_224",
        enhancer_kwargs: dict[str, Any] | None = None,
        objective: Objective = "respix",
        image_size: int | None = None,
        tokenizer_ckpt: str | None = None,
        tokenizer: ImageTokenizer | None = None,
        allow_random_tokenizer: bool = False,
        generator: str = "beit_base_patch16_224",
        generator_kwargs: dict[str, Any] | None = None,
        masking: MaskGenerator | None = None,
        temperature: float = 1.0,
        enhancer_weight: float = 1.0,
        window: int = 8,
        clip_grad_norm: float | None = None,
        optim: OptimConfig = CIM_OPTIM,
        compile: bool = False,
        grad_checkpointing: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim, ignore=["tokenizer", "masking", "weights"])
        owner = type(self).__name__
        check_positive(owner, temperature=temperature, clip_grad_norm=clip_grad_norm)
        check_non_negative(owner, enhancer_weight=enhancer_weight)
        self.mean, self.std = checked_normalization(owner, mean, std)
        enhancer_names = TimmArgs(owner, "enhancer", "enhancer_kwargs")
        kwargs = dict(enhancer_kwargs or {})
        if timm_family(enhancer, enhancer_names) != "timm.models.resnet":
            kwargs.setdefault("drop_path_rate", 0.1)
            kwargs.setdefault("init_values", 0.1)
        self.tokenizer = frozen_tokenizer(owner, tokenizer_ckpt, tokenizer, allow_random_tokenizer)
        self.enhancer = Enhancer(enhancer, objective, image_size, names=enhancer_names, **kwargs)
        self.image_size = self.enhancer.image_size
        grid = self.enhancer.grid_size
        width = self.enhancer.width if self.enhancer.is_vit else 768
        gen_kwargs = {
            "depth": 4,
            "embed_dim": width,
            "num_heads": max(1, width // 64),
            "img_size": self.image_size,
            "patch_size": self.image_size // grid[0],
            **(generator_kwargs or {}),
        }
        self.generator = TokenGenerator(
            generator, self.tokenizer.vocab_size, TimmArgs(owner, "generator", "generator_kwargs"), **gen_kwargs
        )
        if self.generator.encoder.grid_size != grid:
            raise ValueError(
                f"{owner}(generator_kwargs): the generator's patch grid {self.generator.encoder.grid_size} does not "
                f"match the enhancer's token grid {grid}; set generator_kwargs.patch_size"
            )
        self.tokenizer_size = grid[0] * self.tokenizer.downsample
        self.masking = (
            masking if masking is not None else BlockMasking(grid, num_masking_patches=round(0.5 * grid[0] * grid[1]))
        )
        check_mask_grid(owner, self.masking, grid, "token grid")
        check_mask_count(owner, self.masking)
        if objective == "respix" and not 2 <= window <= 2 * self.image_size - 1:
            raise ValueError(
                f"{owner}(window={window}): the ResPix window must be at least 2 pixels (a 1-pixel window "
                f"normalises every pixel to 0) and reflect-pad within the {self.image_size}-pixel image "
                f"(at most {2 * self.image_size - 1})"
            )
        self.objective = objective
        self.temperature = temperature
        self.enhancer_weight = enhancer_weight
        self.window = window
        self.clip_grad_norm = clip_grad_norm
        self.use_compile = compile
        for network in (self.enhancer.backbone, self.generator.encoder):
            network.set_grad_checkpointing(grad_checkpointing)
        self._masks = MaskDraws(Stream.CIM_MASKS)
        self._sample_stream = CountedStream(Stream.CIM_SAMPLES)
        load_start_weights(self, weights, "cim")

        # ----------------------------------------------------------------------------------- parts

    def train(self, mode: bool = True) -> CIMModule:
        """Sets train/eval mode; the tokenizer stays in eval mode (frozen codebook and norms)."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    def train_views(self) -> MAEViews:
        """Data-loader transform: random resized crop (chosen default BEiT's scale (0.08, 1)) and flip."""
        return MAEViews(size=self.image_size, scale=(0.08, 1.0))

    def eval_views(self) -> EvalView:
        return eval_views(self.image_size)

    def encoder(self, which: Literal["student"] = "student") -> nn.Module:
        """The pre-trained encoder: the enhancer's timm backbone (generator and tokenizer are dropped)."""
        return pick_encoder(self, which, student=self.enhancer.backbone)

    default_export = "student"

    def export_encoders(self) -> dict[str, EncoderSpec]:
        """What :func:`lightning_mim.export.to_timm` can write: the enhancer's backbone only."""
        return {"student": EncoderSpec(self.enhancer.arch, self.enhancer.timm_kwargs, self.enhancer.backbone)}

    def configure_model(self) -> None:
        if self.use_compile:
            compile_in_place(self.generator.encoder, self.enhancer.backbone)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        return configure_adamw(
            self, nn.ModuleDict({"generator": self.generator, "enhancer": self.enhancer}), self.optim
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.clip_grad_norm is not None:
            for network in (self.generator, self.enhancer):
                nn.utils.clip_grad_norm_(network.parameters(), self.clip_grad_norm, foreach=True)

    # ---------------------------------------------------------------------------------- steps
    def compute_losses(self, images_uint8: Tensor, mask: Tensor, generator: torch.Generator | None) -> LossTerms:
        """CIM's terms: the generator's cross-entropy and the enhancer's loss.

        ``loss_gen`` is the generator's cross-entropy on the masked tokens, ``loss_enh`` the enhancer's
        loss on the image rebuilt from the generator's samples (ResPix: the window-normalised pixels;
        RevDet: which tokens were replaced).

        Args:
            images_uint8: uint8 images (B, 3, H, W).
            mask: (B, N) bool over the token grid, True = masked for the generator.
            generator: Draws the generator's samples.

        Returns:
            The terms, the metrics ``gen_accuracy`` and ``replaced_frac``, and the outputs
            ``replaced``, ``corrupted_images`` and ``output`` (for diagnostics).
        """
        pixels = images_uint8.float() / 255.0  # (B, 3, H, W) in [0, 1]
        images = normalize(images_uint8, self.mean, self.std)
        with torch.no_grad():
            small = F.interpolate(
                pixels, size=self.tokenizer_size, mode="bilinear", antialias=True, align_corners=False
            )
            ids = self.tokenizer.encode(small.clamp(0, 1)).flatten(1)  # (B, N)
        logits = self.generator(images, mask)  # (B, N, V)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, N)
        weights = mask.float()
        num_masked = weights.sum().clamp(min=1.0)
        loss_gen = (per_token * weights).sum() / num_masked
        corrupted = sample_tokens(logits, ids, mask, self.temperature, generator)  # (B, N)
        replaced = corrupted != ids  # RevDet labels: a sample equal to the original counts as original
        with torch.no_grad():
            grid = self.enhancer.grid_size
            decoded = self.tokenizer.decode(corrupted.view(-1, *grid))  # (B, 3, h*d, w*d) in [0, 1]
            decoded = F.interpolate(decoded.float(), size=self.image_size, mode="bilinear", align_corners=False)
            corrupted_images = normalize(decoded.clamp(0, 1) * 255.0, self.mean, self.std)
        out = self.enhancer(corrupted_images)
        if self.objective == "revdet":
            loss_enh = F.binary_cross_entropy_with_logits(out.float(), replaced.float())
        else:
            loss_enh = F.mse_loss(out.float(), window_normalize(images, self.window))
        with torch.no_grad():
            accuracy = ((logits.argmax(dim=-1) == ids).float() * weights).sum() / num_masked
        return LossTerms(
            {"loss_gen": loss_gen, "loss_enh": loss_enh},
            {"loss_enh": self.enhancer_weight},
            metrics={"gen_accuracy": accuracy, "replaced_frac": replaced.float().mean()},
            outputs={"replaced": replaced, "corrupted_images": corrupted_images, "output": out},
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["images"]
        mask = self._masks.training(self, self.masking, images.shape[0])  # (B, N)
        return self.compute_losses(images, mask, self._sample_stream.next(self.global_rank, self.device)).log(self)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["images"]
        mask = self._masks.validation(self, self.masking, images.shape[0], batch_idx)
        sampler = make_generator(Stream.CIM_SAMPLES, rank=self.global_rank, base=batch_idx, device=self.device)
        result = self.compute_losses(images, mask, sampler)
        for key, value in {**result.terms, "gen_accuracy": result.metrics["gen_accuracy"]}.items():
            self.log(f"val/{key}", value, sync_dist=True)

    def diagnostics(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Panels for VisualDiagnostics: see :func:`~lightning_mim.pictures.cim_panels`."""
        mask = self.masking(images.shape[0], device=self.device, generator=generator)
        outputs = self.compute_losses(images, mask, generator).outputs
        target = window_normalize(normalize(images, self.mean, self.std), self.window)
        return cim_panels(images, mask, outputs, target, self.enhancer.grid_size, self.mean, self.std, self.objective)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled enhancer features for uint8 images, as its timm export computes them: (B, D)."""
        return self.enhancer.pooled(normalize(images, self.mean, self.std))

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_method_state(checkpoint, "cim", self, {"mask_stream": self._masks, "sample_stream": self._sample_stream})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_method_state(checkpoint, "cim", {"mask_stream": self._masks, "sample_stream": self._sample_stream})
