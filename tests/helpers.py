"""Shared test helpers: tiny models and trainers, a folder of sample images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_mim.data.datamodule import SAMPLE_FILE

TINY_BEIT: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
FOLDER_TRAIN, FOLDER_VAL = 200, 50  # images per split of write_sample_folder


def write_sample_folder(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """Sample JPEGs, their stored bytes unchanged, as ``root/{train,val}/<class>/<n>.jpg``; (path, label) per split.

    ``FOLDER_TRAIN`` training images in 10 classes (plus one broken file, ``train/airplane/broken.jpg``)
    and ``FOLDER_VAL`` validation images, 32 px.
    """
    payload = torch.load(SAMPLE_FILE, weights_only=True)
    written: dict[str, list[tuple[Path, int]]] = {}
    for split, source, count in (("train", "train", FOLDER_TRAIN), ("val", "test", FOLDER_VAL)):
        data, offsets, labels = payload[f"{source}_bytes"], payload[f"{source}_offsets"], payload[f"{source}_labels"]
        written[split] = []
        for i in range(count):
            j = i * len(labels) // count  # evenly spaced: the file is sorted by class
            label = int(labels[j])
            folder = root / split / payload["classes"][label]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{j:05d}.jpg"
            path.write_bytes(data[int(offsets[j]) : int(offsets[j + 1])].numpy().tobytes())
            written[split].append((path, label))
    (root / "train" / "airplane" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return written


class CrashAt(pl.Callback):
    """Raises ``RuntimeError("simulated crash")`` at the start of optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


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


def tiny_method(method: str, drop_path: float = 0.0) -> tuple[pl.LightningModule, nn.Module]:
    """A tiny 32-px instance of a method module and its teacher / target (what must agree across ranks).

    ``method``: conmim, mimco, mocov3, vq_tokenizer, cim or cmae. ``drop_path`` sets the ViTs' drop path
    rate, which draws from the global random stream.
    """
    from lightning_mim import CIMModule, CMAEModule, ConMIMModule, MimCoModule, MoCoV3Module, VQTokenizerModule
    from lightning_mim.masking import BlockMasking
    from lightning_mim.nn import VQTokenizer
    from lightning_mim.optim import OptimConfig

    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    if method == "conmim":
        module: pl.LightningModule = ConMIMModule(
            backbone_kwargs={**TINY_BEIT, "drop_path_rate": drop_path},
            proj_hidden_dim=64,
            proj_dim=32,
            momentum=0.9,
            optim=optim,
        )
        teacher = module.teacher
    elif method == "mimco":
        module = MimCoModule(
            backbone_kwargs={**TINY_BEIT, "drop_path_rate": drop_path},
            allow_random_teacher=True,
            patch_hidden_dim=32,
            proj_hidden_dim=64,
            optim=optim,
        )
        teacher = module.teacher
    elif method == "mocov3":
        module = MoCoV3Module(
            backbone_kwargs={**TINY_BEIT, "drop_path_rate": drop_path},
            proj_hidden_dim=64,
            proj_dim=16,
            momentum=0.9,
            optim=optim,
        )
        teacher = module.momentum_branch
    elif method == "vq_tokenizer":
        module = VQTokenizerModule(
            vocab_size=32, code_dim=8, hidden_dim=16, num_res_blocks=1, downsample=4, image_size=32, optim=optim
        )
        teacher = module.tokenizer  # checksum of parameters and the EMA codebook buffers (below)
    elif method == "cim":
        module = CIMModule(
            enhancer="vit_small_patch16_224",
            enhancer_kwargs={**TINY_BEIT, "patch_size": 4, "drop_path_rate": drop_path},
            tokenizer=VQTokenizer(vocab_size=32, code_dim=8, hidden_dim=16, num_res_blocks=1, downsample=4),
            generator_kwargs={"depth": 1},
            masking=BlockMasking(8, num_masking_patches=32, min_num_patches=4),
            window=4,
            optim=optim,
        )
        teacher = module.enhancer
    elif method == "cmae":
        module = CMAEModule(
            backbone="vit_small_patch16_224",
            backbone_kwargs={**TINY_BEIT, "patch_size": 4, "drop_path_rate": drop_path},
            decoder_dim=32,
            decoder_depth=1,
            decoder_heads=2,
            proj_hidden_dim=64,
            proj_dim=16,
            momentum=0.9,
            optim=optim,
        )
        teacher = module.target_encoder
    else:
        raise ValueError(f"tiny_method: unknown method {method!r} (conmim, mimco, mocov3, vq_tokenizer, cim, cmae)")
    return module, teacher


class StopAtEpochEnd(pl.Callback):
    """Sets ``trainer.should_stop`` at the end of every training epoch, as EarlyStopping and Timer do."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


class LinearOnCrops(pl.LightningModule):
    """A linear model on random 16-px crops: its weights depend on every batch, its order and its views."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 16 * 16, 4)

    @staticmethod
    def crop(image: torch.Tensor) -> dict[str, torch.Tensor]:
        from torchvision.transforms import v2

        return {"images": v2.RandomHorizontalFlip()(v2.RandomCrop(16)(image))}

    def train_views(self) -> Any:
        return self.crop

    def eval_views(self) -> Any:
        return lambda image: {"images": image[:, :16, :16]}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.net(batch["images"].float().flatten(1) / 255.0) - 1.0).pow(2).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit_stopping_at_epoch_end(
    data: pl.LightningDataModule, tmp: Any, stop: bool, ckpt_path: str | None = None
) -> tuple[LinearOnCrops, pl.Trainer]:
    """Two epochs of a step-limited run (as the quickstarts: ``max_steps`` set, validation every 250
    steps), optionally stopped at the end of the first; ``last.ckpt`` in ``tmp``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(7)
    module = LinearOnCrops()
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=tmp, save_last=True)]
    trainer = cpu_trainer(
        max_epochs=2,
        max_steps=1000,
        val_check_interval=250,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[*callbacks, *([StopAtEpochEnd()] if stop else [])],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def assert_epoch_boundary_resume_is_exact(data: Any, tmp: Path) -> None:
    """A 2-epoch, 6-step run stopped at its first epoch boundary and resumed from ``last.ckpt`` ends like
    the uninterrupted run: 6 steps, the same weights. ``data()`` builds a fresh data module of 3 steps."""
    reference, trainer = fit_stopping_at_epoch_end(data(), tmp / "a", stop=False)
    assert trainer.global_step == 6
    _, stopped = fit_stopping_at_epoch_end(data(), tmp / "b", stop=True)
    assert stopped.global_step == 3
    resumed, trainer = fit_stopping_at_epoch_end(data(), tmp / "b", stop=False, ckpt_path=str(tmp / "b" / "last.ckpt"))
    assert trainer.global_step == 6
    torch.testing.assert_close(resumed.net.weight, reference.net.weight, atol=1e-6, rtol=0)
