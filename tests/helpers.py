"""Shared test helpers: tiny models and trainers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

TINY_BEIT: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def cpu_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def flat(module: nn.Module) -> torch.Tensor:
    """All parameters of ``module`` as one detached vector."""
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def losses_on_fixed_batch(
    module: pl.LightningModule, batch: dict[str, torch.Tensor], steps: int, lr: float
) -> list[float]:
    """Trains ``module``'s trainable parameters with AdamW on one batch; the loss of every step."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
