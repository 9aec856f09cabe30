"""End-to-end fine-tuning of a pre-trained encoder (the BEiT/MAE protocol).

It starts from an export folder (``lightning-mim export``), a method checkpoint, or — as the
baseline every pre-training result should be read against — a randomly initialised encoder of the
same architecture (``weights: null``): a timm classifier trained end to end with layer-wise lr
decay, drop path, RandAugment (in the views), random erasing and mixup/cutmix on the device (timm),
label smoothing, AdamW + warmup + cosine. :class:`~lightning_mim.methods.linear_probe.LinearProbeModule`
is the frozen-encoder protocol.

Batch keys (uint8 images): ``images`` (B, 3, H, W), ``labels`` (B,). Logged: ``train/loss``,
``val/loss``, ``val/top1``, ``val/top5`` (accuracies as fractions, torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor

from lightning_mim._rng import CountedStream, Stream
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD, ClassificationViews, EvalView, normalize
from lightning_mim.methods._evaluation import accuracy_metrics, evaluate, load_step_stream, pretrained_encoder
from lightning_mim.methods._parts import checked_normalization, eval_views
from lightning_mim.methods._state import record_hparams, save_method_state
from lightning_mim.methods._validation import check_choice, check_input_size, check_positive
from lightning_mim.methods.settings import FINETUNE_OPTIM
from lightning_mim.optim import OptimConfig, configure_adamw, param_groups, peak_lr, with_schedule

__all__ = ["FINETUNE_OPTIM", "FineTuneModule"]


class FineTuneModule(pl.LightningModule):
    """End-to-end fine-tuning of a pre-trained encoder (see the module docstring).

    Args:
        weights: Export folder or method checkpoint; None trains ``arch`` from a random init.
        arch: timm name (read from ``weights`` when None). Without ``weights``, a ViT/BEiT is built for
            ``image_size`` inputs unless ``model_kwargs`` sets ``img_size``.
        model_kwargs: Extra timm arguments (over those of the weights).
        which: Encoder of a checkpoint (None: the method's recommended one).
        random_init: Use the architecture of ``weights`` with a random initialisation (the baseline).
        num_classes: Classes.
        global_pool: ``"avg"`` (mean of patch tokens + fc_norm; ConMIM/CMAE/BEiT) or ``"token"`` (CLS).
        drop_path_rate: Stochastic depth (recipes: 0.1).
        mixup: Mixup alpha (0 disables).
        cutmix: CutMix alpha (0 disables).
        label_smoothing: Label smoothing (recipes: 0.1).
        random_erasing: Random-erasing probability, per-pixel noise on the normalised image (0.25).
        image_size: Training crop side.
        eval_image_size: Evaluation crop side (default: ``image_size``; "ResNet strikes back" trains
            at 160 and tests at 224).
        randaugment: (ops, magnitude) of the training views (recipes: 2, 9), or None.
        optimizer: ``"adamw"`` (ViT recipes) or ``"lamb"`` (timm's LAMB, the ResNet-50 recipe).
        optim: Learning rate, weight decay, layer decay and warmup-cosine; default ``FINETUNE_OPTIM``.
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
        global_pool: str = "avg",
        drop_path_rate: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
        random_erasing: float = 0.25,
        image_size: int = 224,
        eval_image_size: int | None = None,
        randaugment: tuple[int, int] | None = (2, 9),
        optimizer: Literal["adamw", "lamb"] = "adamw",
        optim: OptimConfig = FINETUNE_OPTIM,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.optim = record_hparams(self, optim)
        owner = type(self).__name__
        check_choice(owner, ("adamw", "lamb"), optimizer=optimizer)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"{owner}(label_smoothing={label_smoothing}): must be in [0, 1)")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"{owner}(random_erasing={random_erasing}): a probability must be in [0, 1]")
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"{owner}(mixup={mixup}, cutmix={cutmix}): Beta-distribution alphas must be >= 0")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"{owner}(drop_path_rate={drop_path_rate}): a drop probability must be in [0, 1)")
        check_positive(owner, eval_image_size=eval_image_size)
        self.mean, self.std = checked_normalization(owner, mean, std)
        self.model = pretrained_encoder(
            owner,
            weights,
            arch,
            model_kwargs,
            which,
            global_pool,
            random_init,
            image_size=image_size,
            task_classes=num_classes,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
        )
        check_input_size(owner, self.model, image_size=image_size, eval_image_size=eval_image_size)
        self.mixup = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup > 0 or cutmix > 0
            else None
        )
        self.erasing_p = random_erasing
        self._erasing: RandomErasing | None = None
        self._soft_ce = SoftTargetCrossEntropy()
        self.label_smoothing = label_smoothing
        self.image_size = image_size
        self.eval_image_size = eval_image_size or image_size
        self.randaugment = randaugment
        self.optimizer = optimizer
        self.accuracy = accuracy_metrics(num_classes)
        self._step_stream = CountedStream(Stream.STEPS)

    _method = "finetune"

    def train_views(self) -> ClassificationViews:
        return ClassificationViews(self.image_size, randaugment=self.randaugment)

    def eval_views(self) -> EvalView:
        return eval_views(self.eval_image_size)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        if self.optimizer == "adamw":
            return configure_adamw(self, self.model, self.optim)
        from timm.optim import Lamb

        peak = peak_lr(self, self.optim)
        groups = param_groups(self.model, self.optim.weight_decay, self.optim.layer_decay)
        for group in groups:
            group["lr"] = peak * group.pop("lr_scale", 1.0)
        optimizer = Lamb(groups, lr=peak, betas=self.optim.betas, eps=self.optim.eps)
        return with_schedule(self, optimizer, self.optim)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._step_stream.seed_global(self.global_rank, advance=True)  # resumable mixup and erasing
        images, labels = normalize(batch["images"], self.mean, self.std), batch["labels"]
        if self.erasing_p > 0:
            if self._erasing is None:  # built once, on the device the batches arrive on
                self._erasing = RandomErasing(self.erasing_p, mode="pixel", device=str(images.device))
            images = self._erasing(images)
        if self.mixup is not None and images.shape[0] % 2 == 0:  # timm's batch mixup pairs images
            images, targets = self.mixup(images, labels)
            loss = self._soft_ce(self.model(images).float(), targets)
        else:
            loss = F.cross_entropy(self.model(images).float(), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        evaluate(self, self.model(normalize(batch["images"], self.mean, self.std)), batch["labels"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_method_state(checkpoint, self._method, streams={"step_stream": self._step_stream})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_step_stream(checkpoint, self._method, self._step_stream)
