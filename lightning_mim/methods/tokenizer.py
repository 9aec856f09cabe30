"""CIM stage 0: training the VQ tokenizer that CIM then keeps frozen.

The tokenizer (:class:`~lightning_mim.nn.VQTokenizer`) is a small VQ-VAE: a convolutional encoder
downsampling by 8, an EMA codebook with dead-code restart, and a mirrored decoder, trained with

    loss = mean((decoder(quantized) - x)^2) + commitment * mean((z - sg(quantized))^2)

on images mapped to [-1, 1] (van den Oord et al., "Neural Discrete Representation Learning",
arXiv:1711.00937; EMA codebook as in Razavi et al., arXiv:1906.00446). The codebook is not a
parameter: the quantiser updates it from every training batch.

Batch keys (uint8 images): ``images`` (B, 3, H, W); ``labels`` optional, unused.
Logged: ``train/loss``, ``train/loss_rec``, ``train/loss_commit``, ``train/psnr`` (reconstruction
PSNR in dB of the [0, 1] images) and ``train/codebook_usage`` (fraction of entries used by the
batch); ``val/psnr`` and ``val/codebook_usage`` on validation images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor

from lightning_mim._rng import CountedStream, Stream
from lightning_mim.checkpoint.files import load_checkpoint
from lightning_mim.checkpoint.meta import read_meta
from lightning_mim.data.views import EvalView, MAEViews
from lightning_mim.methods._parts import eval_views
from lightning_mim.methods._state import load_method_state, record_hparams, save_method_state
from lightning_mim.methods._validation import check_crop_scale, check_divisible, check_non_negative, check_positive
from lightning_mim.methods.settings import VQ_TOKENIZER_OPTIM
from lightning_mim.nn.tokenizer import ImageTokenizer, VQTokenizer
from lightning_mim.optim import OptimConfig, configure_adamw

__all__ = ["VQ_TOKENIZER_OPTIM", "VQTokenizerModule", "frozen_tokenizer", "load_vq_tokenizer", "psnr"]


def psnr(reconstruction: Tensor, images: Tensor) -> Tensor:
    """Mean over the batch of the per-image PSNR in dB, for images (B, C, H, W) in [0, 1]."""
    mse = (reconstruction.float() - images.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (-10.0 * torch.log10(mse.clamp(min=1e-10))).mean()


def _usage(ids: Tensor, vocab_size: int) -> Tensor:
    """Fraction of the vocabulary that occurs in ``ids``."""
    return (torch.bincount(ids.flatten(), minlength=vocab_size) > 0).float().mean()


class VQTokenizerModule(pl.LightningModule):
    """Trains a :class:`~lightning_mim.nn.VQTokenizer` (CIM stage 0; see the module docstring).

    Args:
        vocab_size: Codebook entries (spec: 512-1024; chosen default 1024).
        code_dim: Code width (spec: 32-64; chosen default 32).
        hidden_dim: Convolution width (chosen default 128).
        num_res_blocks: Residual blocks in encoder and decoder (chosen default 2).
        downsample: Pixels per token side (spec: 8).
        ema_decay: Codebook EMA decay (chosen default 0.99).
        dead_threshold: Average vectors per batch below which an entry is restarted (default 1).
        commitment: Weight of the commitment term (VQ-VAE: 0.25).
        image_size: Training crop side (spec: 112, CIM's tokenizer resolution at 224 px).
        crop_scale: Area range of the random resized crop (chosen default BEiT's (0.08, 1)).
        optim: AdamW + warmup-cosine settings; default ``VQ_TOKENIZER_OPTIM``.
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        code_dim: int = 32,
        hidden_dim: int = 128,
        num_res_blocks: int = 2,
        downsample: int = 8,
        ema_decay: float = 0.99,
        dead_threshold: float = 1.0,
        commitment: float = 0.25,
        image_size: int = 112,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optim: OptimConfig = VQ_TOKENIZER_OPTIM,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim)
        owner = type(self).__name__
        check_positive(owner, image_size=image_size, downsample=downsample, code_dim=code_dim, hidden_dim=hidden_dim)
        check_non_negative(owner, num_res_blocks=num_res_blocks, commitment=commitment)
        check_divisible(owner, image_size=image_size, downsample=downsample)
        self.tokenizer = VQTokenizer(
            vocab_size, code_dim, hidden_dim, num_res_blocks, downsample, ema_decay, dead_threshold
        )
        self.commitment = commitment
        self.image_size = image_size
        self.crop_scale = check_crop_scale(owner, crop_scale)
        self._step_stream = CountedStream(Stream.STEPS)

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """The :class:`VQTokenizer` arguments, as stored in checkpoints."""
        keys = ("vocab_size", "code_dim", "hidden_dim", "num_res_blocks", "downsample", "ema_decay", "dead_threshold")
        return {k: self.hparams[k] for k in keys}

    def train_views(self) -> MAEViews:
        """Data-loader transform: a random resized crop and flip at ``image_size``."""
        return MAEViews(size=self.image_size, scale=(self.crop_scale[0], self.crop_scale[1]))

    def eval_views(self) -> EvalView:
        return eval_views(self.image_size)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        return configure_adamw(self, self.tokenizer, self.optim)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._step_stream.seed_global(self.global_rank, advance=True)  # resumable codebook restarts
        images = batch["images"].float() / 255.0  # (B, 3, H, W) in [0, 1]
        reconstruction, ids, commitment = self.tokenizer(images)
        loss_rec = F.mse_loss(reconstruction.float(), images * 2 - 1)
        loss = loss_rec + self.commitment * commitment
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_rec", loss_rec)
        self.log("train/loss_commit", commitment)
        with torch.no_grad():
            self.log("train/psnr", psnr(((reconstruction + 1) / 2).clamp(0, 1), images), prog_bar=True)
            self.log("train/codebook_usage", _usage(ids, self.tokenizer.vocab_size))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["images"].float() / 255.0
        ids = self.tokenizer.encode(images)
        self.log("val/psnr", psnr(self.tokenizer.decode(ids), images), sync_dist=True)
        self.log("val/codebook_usage", _usage(ids, self.tokenizer.vocab_size), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        streams = {"step_stream": self._step_stream}
        save_method_state(checkpoint, "vq_tokenizer", streams=streams, tokenizer=self.tokenizer_kwargs())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # "step_stream" is absent from checkpoints of version 0.1
        load_method_state(checkpoint, "vq_tokenizer", {"step_stream": self._step_stream}, optional=["step_stream"])


def load_vq_tokenizer(path: str | Path) -> VQTokenizer:
    """The tokenizer of a :class:`VQTokenizerModule` checkpoint (``weights_only=True``), frozen, eval mode."""
    hint = "train one first (stage 0), e.g. `lightning-mim fit --config configs/quickstart/vq_tokenizer.yaml`"
    checkpoint = load_checkpoint(path, "tokenizer checkpoint", hint)
    meta = read_meta(checkpoint, "vq_tokenizer")  # a clear error for another method's checkpoint
    tokenizer = VQTokenizer(**meta["tokenizer"])
    prefix = "tokenizer."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    tokenizer.load_state_dict(state)
    return tokenizer.requires_grad_(False).eval()


_NO_TOKENIZER = (
    "no tokenizer: CIM needs a frozen one; pass tokenizer_ckpt (a VQTokenizerModule checkpoint, e.g. from "
    "`lightning-mim fit --config configs/quickstart/vq_tokenizer.yaml`), a tokenizer object (e.g. "
    "lightning_mim.nn.DALLETokenizer), or allow_random_tokenizer=True for smoke runs"
)


def frozen_tokenizer(
    owner: str, path: str | None, tokenizer: ImageTokenizer | None, allow_random: bool
) -> ImageTokenizer:
    """CIM's frozen tokenizer (eval mode, no gradients): from a stage-0 checkpoint, a given object, or random.

    Raises:
        ValueError: Both or neither given (and random not allowed), in the ``Owner(argument=value): why`` form.
    """
    if path is not None and tokenizer is not None:
        raise ValueError(
            f"{owner}(tokenizer_ckpt={path!r}, tokenizer=<{type(tokenizer).__name__}>): pass one of them, not both"
        )
    if tokenizer is None:
        if path is not None:
            tokenizer = load_vq_tokenizer(Path(path))
        elif allow_random:
            tokenizer = VQTokenizer()
        else:
            raise ValueError(f"{owner}(tokenizer_ckpt=None, tokenizer=None): {_NO_TOKENIZER}")
    return tokenizer.requires_grad_(False).eval()
