"""Pieces the two evaluation protocols (fine-tuning, linear probing) share."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_mim._rng import CountedStream
from lightning_mim.checkpoint.weights import load_encoder
from lightning_mim.methods._state import load_method_state
from lightning_mim.methods._validation import check_positive
from lightning_mim.nn.timm_models import TimmArgs, is_token_model, timm_family

__all__ = ["accuracy_metrics", "evaluate", "load_step_stream", "pretrained_encoder", "random_vit_size"]


def pretrained_encoder(
    owner: str,
    weights: str | None,
    arch: str | None,
    model_kwargs: dict[str, Any] | None,
    which: str | None,
    global_pool: str,
    random_init: bool,
    *,
    image_size: int,
    task_classes: int,
    **timm_kwargs: Any,
) -> Any:
    """:func:`~lightning_mim.checkpoint.weights.load_encoder` for an evaluation protocol, checked first.

    ``owner`` names the module in errors; the task has ``task_classes`` classes (at least 2) and
    ``image_size`` crops, for which a ViT/BEiT built without weights is built. ``timm_kwargs`` go to
    ``timm.create_model`` (e.g. ``num_classes`` of the model's own head).
    """
    if task_classes < 2:
        raise ValueError(f"{owner}(num_classes={task_classes}): a classifier needs at least 2 classes")
    check_positive(owner, image_size=image_size)
    if arch is not None:
        timm_family(arch, TimmArgs(owner, "arch", "model_kwargs"))
        model_kwargs = random_vit_size(weights, arch, model_kwargs, image_size)
    return load_encoder(weights, arch, model_kwargs, which, global_pool, random_init, **timm_kwargs)


def load_step_stream(checkpoint: dict[str, Any], method: str, stream: CountedStream) -> None:
    """Restores an evaluation module's step stream (checkpoints before 0.3 kept it under another key)."""
    if "lightning_mim.step_stream" in checkpoint:
        stream.load_state_dict(checkpoint["lightning_mim.step_stream"])
    elif "lightning_mim" in checkpoint:
        load_method_state(checkpoint, method, {"step_stream": stream})


def accuracy_metrics(num_classes: int) -> nn.ModuleDict:
    """top-1 and top-5 accuracy (torchmetrics: reduced over ranks)."""
    return nn.ModuleDict(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes)),
        }
    )


def random_vit_size(
    weights: str | None, arch: str, model_kwargs: dict[str, Any] | None, image_size: int
) -> dict[str, Any] | None:
    """``model_kwargs`` with ``img_size=image_size`` for a ViT/BEiT built without weights.

    Its input size is otherwise the architecture's default (e.g. 224), which cannot take
    ``image_size`` crops.
    """
    if weights is not None or "img_size" in (model_kwargs or {}) or not is_token_model(arch):
        return model_kwargs
    return {**(model_kwargs or {}), "img_size": image_size}


def evaluate(module: Any, logits: Tensor, labels: Tensor) -> None:
    """Logs val/loss and top-1 / top-5 (torchmetrics, reduced over ranks) of a classifier module."""
    top1, top5 = module.accuracy["top1"], module.accuracy["top5"]
    assert isinstance(top1, MulticlassAccuracy) and isinstance(top5, MulticlassAccuracy)
    module.log("val/loss", F.cross_entropy(logits.float(), labels), sync_dist=True)
    top1(logits, labels)
    top5(logits, labels)
    module.log("val/top1", top1, prog_bar=True)
    module.log("val/top5", top5)
