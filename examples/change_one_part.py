"""Change one part of a method by subclassing it: ConMIM with another projector and a temperature schedule.

Every method builds its heads through ``build_*`` hooks before it copies the teacher, so overriding
a hook changes student and teacher alike, and the module's arguments (what the checkpoint and
``--print_config`` record) stay true. ``compute_losses`` is the algorithm; ``training_step`` only
draws the views and masks, calls it and logs the terms.

    python examples/change_one_part.py                 # 60 steps on the bundled images, CPU
    python examples/change_one_part.py --max-steps 5

Or from the command line with its config: ``--model.class_path change_one_part.LinearHeadConMIM``
run from this folder (the working directory is importable).
"""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
from torch import nn

from lightning_mim import ConMIMModule
from lightning_mim.data import SampleDataModule

TINY_BEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3}


class LinearHeadConMIM(ConMIMModule):
    """ConMIM with a single linear projector instead of the 3-layer BatchNorm MLP."""

    def build_projector(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, self.proj_dim)


class ScheduledTemperatureConMIM(LinearHeadConMIM):
    """... and a contrast temperature annealed from ``start`` to the configured one (cosine over the run)."""

    def __init__(self, start_temperature: float = 0.2, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.start_temperature, self.final_temperature = start_temperature, self.temperature

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        progress = self.global_step / max(1, self.trainer.max_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
        self.temperature = self.final_temperature + (self.start_temperature - self.final_temperature) * cosine
        self.log("train/temperature", self.temperature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=60)
    args = parser.parse_args()
    pl.seed_everything(0)
    module = ScheduledTemperatureConMIM(
        start_temperature=0.2, backbone_kwargs=TINY_BEIT, proj_dim=128, momentum=0.99, crop_scale=(0.25, 1.0)
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, logger=False, enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(module, SampleDataModule(batch_size=64, num_workers=1, train_size=1024, val_size=64))
    print(f"student projector: {module.student.projector}")
    print(f"teacher projector: {module.teacher.projector}")
    print(f"temperature: {module.start_temperature} -> {module.temperature:.4f}")
    print(f"train/loss: {float(trainer.callback_metrics['train/loss']):.4f}")


if __name__ == "__main__":
    main()
