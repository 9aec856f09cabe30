"""Linear probing of a frozen pre-trained encoder (the MAE protocol, He et al., arXiv:2111.06377).

The encoder (an export folder, a method checkpoint, or a random initialisation as the baseline) stays
frozen in eval mode; a linear classifier on the CLS token or the mean of the patch tokens, behind a
non-affine BatchNorm, is trained with LARS.

Batch keys (uint8 images): ``images`` (B, 3, H, W), ``labels`` (B,). Logged: ``train/loss``,
``val/loss``, ``val/top1``, ``val/top5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_mim._rng import CountedStream, Stream
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, ClassificationViews, EvalView, normalize
from lightning_mim.methods._evaluation import accuracy_metrics, evaluate, load_step_stream, pretrained_encoder
from lightning_mim.methods._parts import checked_normalization, eval_views
from lightning_mim.methods._state import record_hparams, save_method_state
from lightning_mim.methods._validation import check_choice, check_input_size
from lightning_mim.methods.settings import LINEAR_OPTIM
from lightning_mim.optim import OptimConfig, param_groups, peak_lr, with_schedule

__all__ = ["LINEAR_OPTIM", "LinearProbeModule"]


class LinearProbeModule(pl.LightningModule):
    """Linear probing of a frozen encoder (see the module docstring).

    Args:
        weights: Export folder or method checkpoint; None probes a random ``arch``.
        arch: timm name (read from ``weights`` when None). Without ``weights``, a ViT/BEiT is built for
            ``image_size`` inputs unless ``model_kwargs`` sets ``img_size``.
        model_kwargs: Extra timm arguments.
        which: Encoder of a checkpoint (None: the method's recommended one).
        random_init: Use the architecture of ``weights`` with a random initialisation (the baseline).
        num_classes: Classes.
        pool: ``"cls"`` (MAE's default) or ``"mean"`` (patch tokens); CNNs always average.
        image_size: Crop side.
        optim: LARS + warmup-cosine settings; default ``LINEAR_OPTIM``.
        mean: Normalisation mean (of images in [0, 1]).
        std: Normalisation std.
    """

    def __init__(
        self,
        weights: str | None = None,
        arch: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        which: str | None = None,
        random_init: bool = False,
        num_classes: int = 1000,
        pool: Literal["cls", "mean"] = "cls",
        image_size: int = 224,
        optim: OptimConfig = LINEAR_OPTIM,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim)
        owner = type(self).__name__
        check_choice(owner, ("cls", "mean"), pool=pool)
        self.mean, self.std = checked_normalization(owner, mean, std)
        # "token" pooling keeps the pre-trained final norm on every token; features are pooled below
        encoder = pretrained_encoder(
            owner,
            weights,
            arch,
            model_kwargs,
            which,
            "token",
            random_init,
            image_size=image_size,
            task_classes=num_classes,
            num_classes=0,  # no timm head: features only
        )
        check_input_size(owner, encoder, image_size=image_size)
        self.encoder = encoder.requires_grad_(False).eval()
        self.is_transformer = isinstance(encoder, (VisionTransformer, Beit))
        width = int(encoder.num_features)
        linear = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE's linear-probe init
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)
        self.pool = pool
        self.image_size = image_size
        self.accuracy = accuracy_metrics(num_classes)
        self._step_stream = CountedStream(Stream.STEPS)

    _method = "linear_probe"

    def train(self, mode: bool = True) -> LinearProbeModule:
        """Sets train/eval mode; the encoder stays in eval mode (frozen statistics, no dropout)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def train_views(self) -> ClassificationViews:
        """Random resized crop and flip, no RandAugment (the MAE linear-probe augmentation)."""
        return ClassificationViews(self.image_size, randaugment=None)

    def eval_views(self) -> EvalView:
        return eval_views(self.image_size)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Frozen features (B, D) of uint8 images."""
        x = self.encoder.forward_features(normalize(images, self.mean, self.std))
        if not self.is_transformer:
            return x.mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)
        prefix = int(getattr(self.encoder, "num_prefix_tokens", 1))
        return x[:, 0] if self.pool == "cls" else x[:, prefix:].mean(dim=1)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        from timm.optim import Lars

        peak = peak_lr(self, self.optim)
        groups = param_groups(self.head, self.optim.weight_decay)
        for group in groups:  # LARS trust ratio on the weight matrix only, as MAE's LARS
            group["always_adapt"] = any(p.ndim > 1 for p in group["params"])
        optimizer = Lars(groups, lr=peak, momentum=0.9)
        return with_schedule(self, optimizer, self.optim)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._step_stream.seed_global(self.global_rank, advance=True)
        loss = F.cross_entropy(self.head(self.features(batch["images"]).float()), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        evaluate(self, self.head(self.features(batch["images"]).float()), batch["labels"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_method_state(checkpoint, self._method, streams={"step_stream": self._step_stream})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_step_stream(checkpoint, self._method, self._step_stream)
