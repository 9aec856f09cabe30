"""VisualDiagnostics: pictures of what a MIM method sees and produces, logged during training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from lightning_mim._rng import Stream, make_generator

__all__ = ["VisualDiagnostics"]


class VisualDiagnostics(Callback):
    """Every ``every_n_steps`` optimizer steps, logs a grid of what the method does to a few images.

    One row per image: the input, the mask, then the method's own panels (CMAE: its pixel
    reconstruction; CIM: the corrupted image and the enhancer's output; ConMIM/MimCo: the per-patch
    cosine similarity of student and teacher features, blue = -1 to red = 1). The module provides them
    through ``diagnostics(images, generator) -> dict[str, Tensor]`` of [0, 1] image batches.

    The images are the first ``num_images`` of the training batch at that step. The module runs in
    eval mode under ``no_grad`` with the diagnostics' own random stream, and every submodule's
    train/eval mode is restored after, so training is not changed. Runs on global rank 0 only.
    With a WandbLogger the grid is logged as ``diagnostics`` (wandb image); for other loggers (CSV,
    TensorBoard) it is written as ``<log_dir>/diagnostics/step_<N>.png``.

    Args:
        every_n_steps: Interval in optimizer steps.
        num_images: Images per grid.
        at_start: Also log before the first optimizer step (step 0).

    Example::

        trainer = Trainer(callbacks=[VisualDiagnostics(every_n_steps=500)])
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 8, at_start: bool = True) -> None:
        if every_n_steps < 1 or num_images < 1:
            raise ValueError("every_n_steps and num_images must be >= 1")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.at_start = at_start
        self.seconds = 0.0  # wall time spent in this callback (for overhead measurements)
        self.written: list[Path] = []
        self._last_step = -1

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.at_start and trainer.global_step == 0:
            self._draw(trainer, pl_module, batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps; with gradient accumulation it repeats over micro-batches
        if trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer, pl_module, batch)

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        diagnostics = getattr(pl_module, "diagnostics", None)
        if not callable(diagnostics):
            raise TypeError(f"{type(pl_module).__name__} has no diagnostics(images, generator) method")
        start = time.perf_counter()
        images = batch["images"][: self.num_images]
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                panels = diagnostics(images, make_generator(Stream.DIAGNOSTICS, base=step, device=images.device))
        finally:
            for module, mode in modes.items():
                module.training = mode
        rows = torch.stack([p.float().clamp(0, 1).cpu() for p in panels.values()], dim=1)  # (B, K, 3, H, W)
        grid = make_grid(rows.flatten(0, 1), nrow=len(panels), padding=1, pad_value=1.0)
        self._log(trainer, grid, step, list(panels))
        self.seconds += time.perf_counter() - start

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step >= 0:
            rank_zero_info(f"VisualDiagnostics: {self.seconds:.2f} s spent on diagnostics in this run")

    def _log(self, trainer: pl.Trainer, grid: Tensor, step: int, names: list[str]) -> None:
        caption = " | ".join(names)
        wrote_file = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="diagnostics", images=[grid], step=step, caption=[caption])
            elif not wrote_file:
                self._save(Path(logger.log_dir or trainer.default_root_dir), grid, step)
                wrote_file = True
        if not trainer.loggers:
            self._save(Path(trainer.default_root_dir), grid, step)

    def _save(self, folder: Path, grid: Tensor, step: int) -> None:
        path = folder / "diagnostics" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.written.append(path)
