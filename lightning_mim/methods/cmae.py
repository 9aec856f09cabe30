"""CMAE: contrastive masked autoencoders (and the MAE baseline).

Huang et al., "Contrastive Masked Autoencoders are Stronger Vision Learners", arXiv:2207.13532.
Defaults follow the official code (ZhichengHuang/CMAE); with ``contrastive_weight=0`` the module is
plain MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377).

The online encoder sees only the visible patches of the online view (65% of 2x2-patch cells
masked). A pixel decoder reconstructs the normalised pixels of the masked patches; a feature decoder
(2 blocks) predicts features at all positions, whose mean goes through a projector and a predictor.
A momentum target branch (EMA encoder without its final norm, EMA projector) embeds the full,
pixel-shifted, colour-augmented target view; InfoNCE over the global batch pulls the two together.

Batch keys (uint8 images, normalised on the device):
    ``images``: (B, 3, H, W) the online view.
    ``target_images``: (B, 3, H, W) the pixel-shifted target view (not needed for plain MAE).
    ``labels``: optional, unused for training.
Validation batches need only ``images``.
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

from lightning_mim._rng import CountedStream, make_generator
from lightning_mim.callbacks.diagnostics import mask_overlay, unnormalize
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.checkpoint.meta import EncoderSpec, read_meta, write_meta
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, CMAEViews, EvalView, MAEViews, normalize
from lightning_mim.losses import info_nce, masked_patch_mse, patchify, unpatchify
from lightning_mim.masking import GridMasking, MaskGenerator
from lightning_mim.methods._validation import (
    check_contrastive_batch,
    check_mask_count,
    check_momenta,
    check_normalization,
    check_positive,
)
from lightning_mim.nn import BNProjector, MAEDecoder, MaskedViT, freeze_sincos_pos_embed
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.heads import sync_batchnorm_on_gpus
from lightning_mim.nn.init import init_mae_vit_
from lightning_mim.nn.timm_models import TimmArgs
from lightning_mim.optim import OptimConfig, WeightDecayRule, configure_adamw, optim_config, resumable_optim

__all__ = ["CMAE_DECAY_RULE", "CMAE_OPTIM", "MAE_DECAY_RULE", "MAE_OPTIM", "CMAEModule"]

#: CMAE's official rule (mmengine ``custom_keys`` with decay_mult 0): parameters whose name contains
#: 'ln', 'bias', 'pos_embed', 'mask_token' or 'cls_token'. The official model names every LayerNorm
#: ``ln*``; timm names them ``norm*``, hence 'norm' here. The projector's and predictor's BatchNorm
#: weights match none of these and ARE decayed (their biases are not).
CMAE_DECAY_RULE = WeightDecayRule(
    one_dim=False,
    bias=False,
    substrings=("norm", "bias", "pos_embed", "mask_token", "cls_token"),
    module_hooks=False,
)

#: The official ViT-B recipe: lr 1.5e-4 per 256 images (2.4e-3 at 4096), AdamW (0.9, 0.95), wd 0.05
#: by ``CMAE_DECAY_RULE``, 40 warmup epochs, cosine to 0.
CMAE_OPTIM = OptimConfig(
    lr=1.5e-4,
    base_batch_size=256,
    min_lr=0.0,
    weight_decay=0.05,
    decay_rule=CMAE_DECAY_RULE,
    betas=(0.9, 0.95),
    warmup_epochs=40,
)

#: MAE's rule (facebookresearch/mae ``main_pretrain.py``: timm 0.3's ``add_weight_decay`` with no skip
#: list): no decay on 1-D parameters and biases only; the class and mask tokens are decayed.
MAE_DECAY_RULE = WeightDecayRule(one_dim=True, bias=True, module_hooks=False)

#: MAE's recipe, for ``CMAEModule(contrastive_weight=0)``: as ``CMAE_OPTIM`` but with ``MAE_DECAY_RULE``.
MAE_OPTIM = dataclasses.replace(CMAE_OPTIM, decay_rule=MAE_DECAY_RULE)

_MASK_STREAM = 2


class _OnlineHeads(nn.Module):
    """Feature decoder -> mean over positions -> projector -> predictor."""

    def __init__(self, feature_decoder: MAEDecoder, projector: BNProjector, predictor: BNProjector) -> None:
        super().__init__()
        self.feature_decoder = feature_decoder
        self.projector = projector
        self.predictor = predictor

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        features = self.feature_decoder(tokens, mask).mean(dim=1)  # (B, D)
        return self.predictor(self.projector(features))  # (B, proj_dim)


class CMAEModule(pl.LightningModule):
    """CMAE pre-training; plain MAE with ``contrastive_weight=0`` (see the module docstring).

    With a contrastive term, the EMA update of the target encoder and projector is installed
    automatically (constant ``momentum``, the official schedule), and under multi-GPU training the
    BatchNorms of the projector and predictor are synchronised across ranks (``sync_batchnorm``).

    Args:
        backbone: timm ViT name (``vit_small_patch16_224``, ``vit_base_patch16_224``, ...).
        backbone_kwargs: timm arguments (e.g. ``img_size``, ``patch_size``, ``embed_dim``).
        masking: Mask generator with a fixed count; default 2x2-patch cells at ratio 0.65 (68 of
            196 patches visible at 224 px).
        decoder_dim: Width of both decoders (official: 512).
        decoder_depth: Pixel decoder blocks (official: 8).
        feature_decoder_depth: Feature decoder blocks (official: 2).
        decoder_heads: Decoder attention heads (official: 16).
        proj_hidden_dim: Projector and predictor hidden width (official: 1536).
        proj_dim: Projection width (official: 256).
        norm_pix: Normalise each target patch (official: True).
        temperature: InfoNCE temperature (official: 0.07); the loss is scaled by 2 * temperature.
        reconstruction_weight: Weight of the pixel loss (official: 1).
        contrastive_weight: Weight of the contrastive loss (official: 1); 0 builds no target
            branch and gives MAE.
        momentum: Constant EMA momentum of the target branch (official: 0.996).
        sync_batchnorm: Synchronise projector/predictor BatchNorm statistics across GPUs (torch's
            SyncBatchNorm needs CUDA; multi-process CPU runs warn and keep per-rank statistics).
        init: ``"official"``: the encoder initialisation of CMAE's and MAE's code
            (:func:`~lightning_mim.nn.init.init_mae_vit_`: xavier-uniform Linears, the patch kernel
            xavier-uniform as a matrix, class token normal(0.02)); ``"timm"`` keeps timm's. The
            decoders always take MAE's initialisation.
        optim: AdamW + warmup-cosine settings; default ``CMAE_OPTIM`` (CMAE's weight-decay rule; for
            the MAE baseline, ``MAE_OPTIM`` has MAE's, as ``configs/mae_vitb.yaml`` sets).
        compile: ``torch.compile`` the encoders and decoders in place when training starts
            (checkpoints unchanged).
        grad_checkpointing: Recompute the trained encoder's blocks in the backward pass (activation
            checkpointing): much less activation memory for about a third more compute (ViT-L).
        mean: Normalisation mean (of images in [0, 1]).
        std: Normalisation std.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        masking: MaskGenerator | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        feature_decoder_depth: int = 2,
        decoder_heads: int = 16,
        proj_hidden_dim: int = 1536,
        proj_dim: int = 256,
        norm_pix: bool = True,
        temperature: float = 0.07,
        reconstruction_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        momentum: float = 0.996,
        sync_batchnorm: bool = True,
        init: Literal["official", "timm"] = "official",
        optim: OptimConfig = CMAE_OPTIM,
        compile: bool = False,
        grad_checkpointing: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["masking", "optim"])
        optim = optim_config(optim)
        self.hparams["optim"] = dataclasses.asdict(optim)  # plain types: checkpoints load with weights_only
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reconstruction_weight < 0 or contrastive_weight < 0:
            raise ValueError("reconstruction_weight and contrastive_weight must be >= 0")
        owner = type(self).__name__
        if reconstruction_weight == 0 and contrastive_weight == 0:
            raise ValueError(
                f"{owner}(reconstruction_weight=0, contrastive_weight=0): the loss would be 0; give one a weight > 0"
            )
        check_positive(
            owner,
            decoder_dim=decoder_dim,
            decoder_heads=decoder_heads,
            proj_hidden_dim=proj_hidden_dim,
            proj_dim=proj_dim,
        )
        if decoder_dim % decoder_heads:
            raise ValueError(
                f"{owner}(decoder_dim={decoder_dim}, decoder_heads={decoder_heads}): the decoder width must be "
                "divisible by its number of attention heads"
            )
        check_momenta(owner, momentum=momentum)
        check_normalization(owner, mean, std)
        names = TimmArgs(owner, "backbone", "backbone_kwargs")
        if init not in ("official", "timm"):
            raise ValueError(f"{owner}(init={init!r}): must be 'official' or 'timm'")
        self.encoder = MaskedViT(backbone, mode="visible", names=names, **(backbone_kwargs or {}))
        vit = self.encoder.vit
        if init == "official":
            init_mae_vit_(vit)
        if vit.pos_embed is None:
            raise ValueError(f"{backbone!r} has no absolute position embedding to fix to sin-cos")
        freeze_sincos_pos_embed(vit.pos_embed, self.encoder.grid_size)
        grid, width = self.encoder.grid_size, self.encoder.embed_dim
        if masking is None and (grid[0] % 2 or grid[1] % 2):
            raise ValueError(
                f"{owner}(backbone_kwargs): the default masking (2x2-patch cells) needs an even patch grid, got "
                f"{grid}; pass another masking generator (e.g. RandomMasking) or change img_size / patch_size"
            )
        self.masking = masking if masking is not None else GridMasking(grid, cell_size=2, mask_ratio=0.65)
        if (self.masking.height, self.masking.width) != grid:
            raise ValueError(
                f"masking grid ({self.masking.height}, {self.masking.width}) does not match "
                f"the backbone's patch grid {grid}"
            )
        if not self.masking.fixed_count:
            raise ValueError(
                f"{type(self.masking).__name__} masks a varying number of patches; CMAE needs a fixed count"
            )
        check_mask_count(owner, self.masking, needs_visible=True)  # the encoder sees the visible patches only
        self.num_visible = self.masking.num_patches - self.masking.num_masking_patches
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.image_size = int(vit.patch_embed.img_size[0])
        pixels = self.patch_size**2 * 3

        def decoder(depth: int, out_dim: int) -> MAEDecoder:
            return MAEDecoder(
                grid, width, out_dim, decoder_dim, depth, decoder_heads, 4.0, self.encoder.num_prefix_tokens
            )

        def head(in_dim: int) -> BNProjector:
            return BNProjector(in_dim, proj_hidden_dim, proj_dim, 2, last_bn=False, hidden_bias=True, bn_eps=1e-6)

        self.pixel_decoder = decoder(decoder_depth, pixels)
        self.contrastive = contrastive_weight > 0
        if self.contrastive:
            # The feature decoder outputs encoder-width features so that one projector shape serves
            # both branches (official ViT-B/16: 768 = 16 * 16 * 3, the same layer).
            self.online_heads = _OnlineHeads(decoder(feature_decoder_depth, width), head(width), head(proj_dim))
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_encoder.vit.norm = nn.Identity()  # the target branch has no final norm
            self.target_projector = copy.deepcopy(self.online_heads.projector).requires_grad_(False)
        self.norm_pix = norm_pix
        self.temperature = temperature
        self.reconstruction_weight = reconstruction_weight
        self.contrastive_weight = contrastive_weight
        self.momentum = momentum
        self.sync_batchnorm = sync_batchnorm
        self.optim = optim
        self.use_compile = compile
        for network in (self.encoder,):
            network.set_grad_checkpointing(grad_checkpointing)
        self.mean, self.std = tuple(mean), tuple(std)
        self._mask_stream = CountedStream(_MASK_STREAM)

    # ----------------------------------------------------------------------------------- parts
    def train_views(self) -> CMAEViews | MAEViews:
        """Data-loader transform: pixel-shifted pairs, or MAE's single view without the contrastive term."""
        return CMAEViews(size=self.image_size) if self.contrastive else MAEViews(size=self.image_size)

    def eval_views(self) -> EvalView:
        """Data-loader transform for validation and kNN images."""
        return EvalView(size=self.image_size, crop_fraction=0.875 if self.image_size >= 64 else 1.0)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs updated by EMA: encoder and projector, not decoders or predictor."""
        if not self.contrastive:
            return []
        return [(self.encoder, self.target_encoder), (self.online_heads.projector, self.target_projector)]

    default_export = "student"

    def export_encoders(self) -> dict[str, EncoderSpec]:
        """What :func:`lightning_mim.export.to_timm` can write: the online encoder, which CMAE fine-tunes.

        The target encoder has no final norm, so it is not a complete timm model and is not offered.
        """
        return {"student": EncoderSpec(self.encoder.arch, self.encoder.timm_kwargs, self.encoder.vit)}

    def configure_callbacks(self) -> list[Callback]:
        if not self.contrastive:
            return []
        return [EMATeacher(momentum=self.momentum, final_momentum=self.momentum, schedule="constant")]

    def setup(self, stage: str) -> None:
        if self.contrastive and self.sync_batchnorm:
            # The official code synchronises these BatchNorms across GPUs.
            self.online_heads = sync_batchnorm_on_gpus(self.trainer, self.online_heads)
            self.target_projector = sync_batchnorm_on_gpus(self.trainer, self.target_projector)

    def on_train_start(self) -> None:
        if self.contrastive:  # the per-device batch is known only once the loader is built
            check_contrastive_batch(self, "the contrastive loss")

    def _compiled_parts(self) -> list[nn.Module]:
        parts: list[nn.Module] = [self.encoder, self.pixel_decoder]
        if self.contrastive:
            parts += [self.target_encoder, self.online_heads.feature_decoder]
        return parts

    def configure_model(self) -> None:
        if self.use_compile:
            compile_in_place(*self._compiled_parts())

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        trainable = nn.ModuleDict({"encoder": self.encoder, "pixel_decoder": self.pixel_decoder})
        if self.contrastive:
            trainable["online_heads"] = self.online_heads
        return configure_adamw(self, trainable, self.optim)

    # ---------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = normalize(batch["images"], self.mean, self.std)
        target_images = normalize(batch["target_images"], self.mean, self.std) if self.contrastive else None
        self._mask_stream.seed_global(self.global_rank)  # dropout, drop path: resumable
        generator = self._mask_stream.next(self.global_rank, self.device)
        mask = self.masking(images.shape[0], device=self.device, generator=generator)  # (B, N)
        loss, loss_rec, loss_con = self._losses(images, target_images, mask)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_rec", loss_rec)
        if self.contrastive:
            self.log("train/loss_con", loss_con)
        return loss

    def _losses(self, images: Tensor, target_images: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tokens = self.encoder(images, mask, num_visible=self.num_visible)  # (B, 1 + N_visible, D)
        pred = self.pixel_decoder(tokens, mask)  # (B, N, P*P*3)
        loss_rec = masked_patch_mse(pred, patchify(images, self.patch_size), mask, self.norm_pix)
        if not self.contrastive or target_images is None:
            return self.reconstruction_weight * loss_rec, loss_rec, torch.zeros_like(loss_rec)
        with torch.no_grad():
            target_tokens = self.target_encoder(target_images)  # (B, 1 + N, D), no final norm
            key = self.target_projector(self.target_encoder.patch_tokens(target_tokens).mean(dim=1))
        query = self.online_heads(tokens, mask)  # (B, proj_dim)
        loss_con = 2 * self.temperature * info_nce(query, key, self.temperature)
        loss = self.reconstruction_weight * loss_rec + self.contrastive_weight * loss_con
        return loss, loss_rec, loss_con

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = normalize(batch["images"], self.mean, self.std)
        generator = make_generator(_MASK_STREAM, rank=self.global_rank, base=batch_idx)
        mask = self.masking(images.shape[0], device=self.device, generator=generator)
        tokens = self.encoder(images, mask, num_visible=self.num_visible)
        loss_rec = masked_patch_mse(
            self.pixel_decoder(tokens, mask), patchify(images, self.patch_size), mask, self.norm_pix
        )
        self.log("val/loss_rec", loss_rec, sync_dist=True)

    def diagnostics(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Panels for :class:`~lightning_mim.callbacks.VisualDiagnostics`: input, mask, and the pixel
        reconstruction (visible patches as given, masked ones predicted; with ``norm_pix`` the
        prediction is mapped back with each target patch's own mean and variance, as MAE shows it)."""
        x = normalize(images, self.mean, self.std)
        mask = self.masking(x.shape[0], device=self.device, generator=generator)
        pred = self.pixel_decoder(self.encoder(x, mask, num_visible=self.num_visible), mask).float()  # (B, N, P*P*3)
        target = patchify(x, self.patch_size)  # (B, N, P*P*3)
        if self.norm_pix:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        patches = torch.where(mask.unsqueeze(-1), pred, target)
        reconstruction = unpatchify(patches, self.patch_size, self.encoder.grid_size)
        pixels = images.float() / 255.0
        return {
            "input": pixels,
            "mask": mask_overlay(pixels, mask, self.encoder.grid_size),
            "reconstruction": unnormalize(reconstruction, self.mean, self.std),
        }

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled features of the online encoder for uint8 images, as its timm export computes them: (B, D)."""
        return self.encoder.pool(self.encoder(normalize(images, self.mean, self.std)))

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_meta(checkpoint, self._method, module=self, mask_stream=self._mask_stream.state_dict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._mask_stream.load_state_dict(read_meta(checkpoint, self._method)["mask_stream"])
        self.optim = resumable_optim(self.optim, checkpoint, type(self).__name__)
        self.hparams["optim"] = dataclasses.asdict(self.optim)

    @property
    def _method(self) -> str:
        return "cmae" if self.contrastive else "mae"
