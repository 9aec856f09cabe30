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
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn

from lightning_mim._rng import Stream
from lightning_mim.callbacks.ema import EMATeacher
from lightning_mim.checkpoint.meta import EncoderSpec
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, CMAEViews, EvalView, MAEViews, normalize
from lightning_mim.losses import info_nce, masked_patch_mse
from lightning_mim.masking import MaskGenerator
from lightning_mim.methods._parts import (
    LossTerms,
    MaskDraws,
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
from lightning_mim.methods._validation import (
    check_choice,
    check_contrastive_batch,
    check_divisible,
    check_loss_weights,
    check_momenta,
    check_positive,
    check_visible_masking,
)
from lightning_mim.methods.settings import (
    CMAE_DECAY_RULE,
    CMAE_OPTIM,
    MAE_DECAY_RULE,
    MAE_OPTIM,
    default_cmae_masking,
    mae_encoder,
)
from lightning_mim.nn import BNProjector, MAEDecoder
from lightning_mim.nn.compile import compile_in_place
from lightning_mim.nn.heads import DecodedImageHead
from lightning_mim.nn.pos_embed import SinCosOrder, sincos_order_of
from lightning_mim.optim import OptimConfig, configure_adamw
from lightning_mim.patches import patchify
from lightning_mim.pictures import reconstruction_panels

__all__ = ["CMAE_DECAY_RULE", "CMAE_OPTIM", "MAE_DECAY_RULE", "MAE_OPTIM", "CMAEModule"]


class CMAEModule(pl.LightningModule):
    """CMAE pre-training; plain MAE with ``contrastive_weight=0`` (see the module docstring).

    With a contrastive term, the EMA update of the target encoder and projector is installed
    automatically (constant ``momentum``, the official schedule), and under multi-GPU training the
    BatchNorms of the projector and predictor are synchronised across ranks (``sync_batchnorm``).

    Args:
        backbone: timm ViT name (``vit_small_patch16_224``, ``vit_base_patch16_224``, ...).
        backbone_kwargs: timm arguments (e.g. ``img_size``, ``patch_size``, ``embed_dim``).
        masking: Mask generator with a fixed count; default 2x2-patch cells at ratio 0.65.
        decoder_dim: Width of both decoders (official: 512).
        decoder_depth: Pixel decoder blocks (official: 8).
        feature_decoder_depth: Feature decoder blocks (official: 2).
        decoder_heads: Decoder attention heads (official: 16).
        proj_hidden_dim: Projector and predictor hidden width (official: 1536).
        proj_dim: Projection width (official: 256).
        norm_pix: Normalise each target patch (official: True).
        temperature: InfoNCE temperature (official: 0.07); the loss is scaled by 2 * temperature.
        reconstruction_weight: Weight of the pixel loss (official: 1).
        contrastive_weight: Weight of the contrastive loss (official: 1); 0 gives MAE (no target branch).
        momentum: Constant EMA momentum of the target branch (official: 0.996).
        sync_batchnorm: Synchronise the projector/predictor BatchNorms across GPUs (CPU runs: per-rank statistics).
        init: ``"official"``: the encoder initialisation of MAE's code (:func:`~lightning_mim.nn.init.init_mae_vit_`);
            ``"timm"`` keeps timm's. The decoders always take MAE's initialisation.
        pos_embed_order: Layout of the fixed sin-cos tables of the encoder and both decoders: which grid
            coordinate the first half of the channels encodes. None: the official code's, ``"rows_first"``
            for CMAE (its ``build_2d_sincos_position_embedding``, as MoCo v3's) and ``"columns_first"``
            for MAE (``contrastive_weight=0``; MAE's ``get_2d_sincos_pos_embed``). A checkpoint whose
            table has the other layout is followed, with a warning.
        optim: AdamW + warmup-cosine; default ``CMAE_OPTIM`` (the MAE baseline: ``MAE_OPTIM``, MAE's decay rule).
        compile: ``torch.compile`` the encoders and decoders in place (checkpoints unchanged).
        grad_checkpointing: Recompute the online encoder's blocks in the backward pass (less memory).
        mean: Normalisation mean (of images in [0, 1]).
        std: Normalisation std.
        weights: Start from the weights of a checkpoint of this method (a converted official one, from
            ``lightning-mim convert``, or one of ours): weights only, a new optimiser and schedule. The
            checkpoint's encoders must match this module's architecture. Not recorded in hparams (the
            checkpoints hold the weights; their ``started_from`` names the file).
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
        pos_embed_order: SinCosOrder | None = None,
        optim: OptimConfig = CMAE_OPTIM,
        compile: bool = False,
        grad_checkpointing: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim, ignore=["masking", "weights"])
        owner = type(self).__name__
        check_positive(owner, temperature=temperature, decoder_dim=decoder_dim, decoder_heads=decoder_heads)
        check_positive(owner, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim)
        check_loss_weights(owner, reconstruction_weight=reconstruction_weight, contrastive_weight=contrastive_weight)
        check_divisible(owner, decoder_dim=decoder_dim, decoder_heads=decoder_heads)
        check_momenta(owner, momentum=momentum)
        self.mean, self.std = checked_normalization(owner, mean, std)
        official_order: SinCosOrder = "rows_first" if contrastive_weight > 0 else "columns_first"
        self.pos_embed_order: SinCosOrder = pos_embed_order or official_order
        self.hparams["pos_embed_order"] = self.pos_embed_order  # recorded as built, not as None
        check_choice(owner, ("rows_first", "columns_first"), pos_embed_order=self.pos_embed_order)
        self.online_encoder = mae_encoder(owner, backbone, backbone_kwargs, init, self.pos_embed_order)
        grid, width = self.online_encoder.grid_size, self.online_encoder.embed_dim
        self.masking = masking if masking is not None else default_cmae_masking(owner, grid)
        check_visible_masking(owner, self.masking, grid)  # the encoder sees the visible patches only
        self.num_visible = self.masking.num_patches - self.masking.num_masking_patches
        patch_embed = self.online_encoder.vit.patch_embed
        self.patch_size, self.image_size = int(patch_embed.patch_size[0]), int(patch_embed.img_size[0])
        self.decoder_dim, self.decoder_heads = decoder_dim, decoder_heads
        self.proj_hidden_dim, self.proj_dim = proj_hidden_dim, proj_dim
        # Decoders and heads come from the hooks before the target branch is copied: a subclass changes both.
        self.pixel_decoder = self.build_decoder(decoder_depth, self.patch_size**2 * 3)
        self.contrastive = contrastive_weight > 0
        self._method = "cmae" if self.contrastive else "mae"  # its name in checkpoints
        if self.contrastive:
            # The feature decoder outputs encoder-width features so that one projector shape serves
            # both branches (official ViT-B/16: 768 = 16 * 16 * 3, the same layer).
            feature_decoder = self.build_decoder(feature_decoder_depth, width)
            projector = self.build_projector(width)
            self.online_heads = DecodedImageHead(feature_decoder, projector, self.build_predictor(proj_dim))
            self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
            self.target_encoder.vit.norm = nn.Identity()  # the target branch has no final norm
            self.target_projector = copy.deepcopy(self.online_heads.projector).requires_grad_(False)
        self.norm_pix, self.temperature, self.momentum = norm_pix, temperature, momentum
        self.reconstruction_weight, self.contrastive_weight = reconstruction_weight, contrastive_weight
        self.sync_batchnorm, self.use_compile = sync_batchnorm, compile
        self.online_encoder.set_grad_checkpointing(grad_checkpointing)
        self._masks = MaskDraws(Stream.CMAE_MASKS)
        load_start_weights(self, weights, self._method)

    def build_decoder(self, depth: int, out_dim: int) -> nn.Module:
        """An MAE decoder of ``depth`` blocks: visible tokens to ``out_dim`` per patch (pixels P*P*3, or features)."""
        enc, dim, heads = self.online_encoder, self.decoder_dim, self.decoder_heads
        prefix = enc.num_prefix_tokens
        return MAEDecoder(enc.grid_size, enc.embed_dim, out_dim, dim, depth, heads, 4.0, prefix, self.pos_embed_order)

    def build_projector(self, in_dim: int) -> nn.Module:
        """The projector of both branches (the target branch gets a copy): CMAE's 2-layer BatchNorm MLP."""
        return self._bn_mlp(in_dim)

    def build_predictor(self, in_dim: int) -> nn.Module:
        """The online branch's predictor: the projector's design."""
        return self._bn_mlp(in_dim)

    def _bn_mlp(self, in_dim: int) -> nn.Module:
        return BNProjector(in_dim, self.proj_hidden_dim, self.proj_dim, 2, last_bn=False, hidden_bias=True, bn_eps=1e-6)

    # ----------------------------------------------------------------------------------- parts
    def train_views(self) -> CMAEViews | MAEViews:
        """Data-loader transform: pixel-shifted pairs, or MAE's single view without the contrastive term."""
        return CMAEViews(size=self.image_size) if self.contrastive else MAEViews(size=self.image_size)

    def eval_views(self) -> EvalView:
        """Data-loader transform for validation and kNN images."""
        return eval_views(self.image_size)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs updated by EMA: encoder and projector, not decoders or predictor."""
        if not self.contrastive:
            return []
        return [(self.online_encoder, self.target_encoder), (self.online_heads.projector, self.target_projector)]

    def encoder(self, which: Literal["student", "teacher"] = "student") -> nn.Module:
        """The online (``"student"``, fine-tuned) or target (``"teacher"``: EMA, no final norm) timm backbone."""
        teacher = {"teacher": self.target_encoder.vit} if self.contrastive else {}
        return pick_encoder(self, which, student=self.online_encoder.vit, **teacher)

    default_export = "student"

    def export_encoders(self) -> dict[str, EncoderSpec]:
        """What :func:`lightning_mim.export.to_timm` can write: the online encoder (the target has no final norm)."""
        online = self.online_encoder
        return {"student": EncoderSpec(online.arch, online.timm_kwargs, online.vit)}

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

    def configure_model(self) -> None:
        if self.use_compile:
            branch = [self.target_encoder, self.online_heads.feature_decoder] if self.contrastive else []
            compile_in_place(self.online_encoder, self.pixel_decoder, *branch)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        trainable = nn.ModuleDict({"encoder": self.online_encoder, "pixel_decoder": self.pixel_decoder})
        if self.contrastive:
            trainable["online_heads"] = self.online_heads
        return configure_adamw(self, trainable, self.optim)

    # ---------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = normalize(batch["images"], self.mean, self.std)
        target_images = normalize(batch["target_images"], self.mean, self.std) if self.contrastive else None
        mask = self._masks.training(self, self.masking, images.shape[0])  # (B, N)
        return self.compute_losses(images, target_images, mask).log(self)

    def compute_losses(self, images: Tensor, target_images: Tensor | None, mask: Tensor) -> LossTerms:
        """CMAE's terms: pixel reconstruction and the contrast of the two branches.

        ``loss_rec``: the masked patches' pixels from the visible ones; ``loss_con``: the online
        branch's image embedding against the momentum branch's embedding of the pixel-shifted view.

        Args:
            images: Normalised online view (B, 3, H, W).
            target_images: Normalised target view (B, 3, H, W); None (or plain MAE): reconstruction only.
            mask: (B, N) bool, True = masked (not seen by the encoder).
        """
        tokens = self.online_encoder(images, mask, num_visible=self.num_visible)  # (B, 1 + N_visible, D)
        pred = self.pixel_decoder(tokens, mask)  # (B, N, P*P*3)
        loss_rec = masked_patch_mse(pred, patchify(images, self.patch_size), mask, self.norm_pix)
        weights = {"loss_rec": self.reconstruction_weight}
        if not self.contrastive or target_images is None:
            return LossTerms({"loss_rec": loss_rec}, weights)
        with torch.no_grad():
            target_tokens = self.target_encoder(target_images)  # (B, 1 + N, D), no final norm
            key = self.target_projector(self.target_encoder.patch_tokens(target_tokens).mean(dim=1))
        query = self.online_heads(tokens, mask)  # (B, proj_dim)
        loss_con = 2 * self.temperature * info_nce(query, key, self.temperature)
        return LossTerms({"loss_rec": loss_rec, "loss_con": loss_con}, {**weights, "loss_con": self.contrastive_weight})

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = normalize(batch["images"], self.mean, self.std)
        mask = self._masks.validation(self, self.masking, images.shape[0], batch_idx)
        self.log("val/loss_rec", self.compute_losses(images, None, mask).terms["loss_rec"], sync_dist=True)

    def diagnostics(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Panels for :class:`~lightning_mim.callbacks.VisualDiagnostics`: input, mask, reconstruction.

        With ``norm_pix``, predictions are mapped back with each target patch's mean and variance, as MAE shows it.
        """
        x = normalize(images, self.mean, self.std)
        mask = self.masking(x.shape[0], device=self.device, generator=generator)
        pred = self.pixel_decoder(self.online_encoder(x, mask, num_visible=self.num_visible), mask)  # (B, N, P*P*3)
        grid = self.online_encoder.grid_size
        return reconstruction_panels(images, mask, pred, self.patch_size, grid, self.mean, self.std, self.norm_pix)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled features of the online encoder for uint8 images, as its timm export computes them: (B, D)."""
        return self.online_encoder.pool(self.online_encoder(normalize(images, self.mean, self.std)))

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_method_state(checkpoint, self._method, self, {"mask_stream": self._masks})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        renamed = {"encoder.": "online_encoder."}  # the online encoder's name before 0.3
        load_method_state(checkpoint, self._method, {"mask_stream": self._masks}, renamed=renamed)
        self._follow_pos_embed_order(checkpoint.get("state_dict", {}).get("online_encoder.vit.pos_embed"))
        self.optim = restore_optim(self, self.optim, checkpoint)

    def _follow_pos_embed_order(self, table: Tensor | None) -> None:
        """Sets the decoders' fixed tables (not in checkpoints) to the layout of a loaded encoder table.

        Checkpoints written before ``pos_embed_order`` existed hold CMAE's encoder table columns first.
        """
        found = sincos_order_of(table, self.online_encoder.grid_size) if table is not None else None
        if found is None or found == self.pos_embed_order:
            return
        rank_zero_warn(
            f"{type(self).__name__}: the checkpoint's sin-cos position table is {found!r}, this module was built "
            f"with pos_embed_order={self.pos_embed_order!r}; following the checkpoint (decoders set to {found!r})"
        )
        self.pos_embed_order = found
        self.hparams["pos_embed_order"] = found
        for module in self.modules():
            if isinstance(module, MAEDecoder):
                module.set_pos_embed_order(found)
