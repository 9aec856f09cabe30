"""Run by tests/test_fsdp.py: ConMIM on 2 CPU processes under DDP or FSDP2 (ModelParallelStrategy)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from lightning_mim import ConMIMModule
from lightning_mim.callbacks import OnlineKNN
from lightning_mim.data import SampleDataModule
from tests.helpers import tiny_method


def full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()
    }


def main(strategy_name: str, out: str) -> None:
    pl.seed_everything(0)
    module, _ = tiny_method("conmim", drop_path=0.1)
    assert isinstance(module, ConMIMModule)
    if strategy_name == "fsdp_checkpointing":  # FSDP2 with activation checkpointing of the student's blocks
        module.student.encoder.vit.set_grad_checkpointing(True)
    sharded = strategy_name.startswith("fsdp")
    strategy = ModelParallelStrategy(save_distributed_checkpoint=False) if sharded else "ddp"
    knn = OnlineKNN(k=5, batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[knn],
    )
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=64, val_size=25))
    result = {
        "student": full(module.student),
        "teacher": full(module.teacher),
        "sharded": [type(p).__name__ for p in module.teacher.parameters()][:1],
        "knn": knn.history,
    }
    trainer.save_checkpoint(f"{out}.ckpt")  # a single file with full tensors (save_distributed_checkpoint=False)
    if trainer.global_rank == 0:
        torch.save(result, f"{out}.pt")


if __name__ == "__main__":
    # STRATEGY[,STRATEGY...] FOLDER: one after another in one launch (Lightning starts rank 1 at the first
    # fit; later fits reuse the process group), each writing FOLDER/STRATEGY.pt and FOLDER/STRATEGY.ckpt
    for name in sys.argv[1].split(","):
        main(name, os.path.join(sys.argv[2], name))
