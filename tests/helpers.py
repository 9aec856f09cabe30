"""Shared test helpers: the tiny backbones and method modules, trainers, a folder of sample images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias, cast

import lightning.pytorch as pl
import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.vision_transformer import Attention as VitAttention
from torch import nn

from lightning_mim import CIMModule, CMAEModule, ConMIMModule, MimCoModule, MoCoV3Module, VQTokenizerModule
from lightning_mim.data.datamodule import SAMPLE_FILE
from lightning_mim.masking import BlockMasking
from lightning_mim.nn import VQTokenizer
from lightning_mim.optim import OptimConfig

# The tiny backbones: timm ViT / BEiT arguments at 32 px, two blocks of two heads. Tests that need
# another size override one key (``{**TINY_VIT_4X4, "depth": 1}``) rather than define a new one.
#: 8-px patches, a 4x4 grid: enough for ConMIM's block masking, MoCo v3 and MimCo; 48 wide.
TINY_VIT_4X4: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
#: 4-px patches, an 8x8 grid: CMAE's grid masking in 2x2 cells, and CIM's 8x8 tokenizer grid; 32 wide.
TINY_VIT_8X8: dict[str, Any] = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
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


def attention_heads(vit: nn.Module) -> int:
    """The number of attention heads in the first block of a timm ViT or BEiT."""
    block = cast(nn.Sequential, vit.blocks)[0]
    return cast(VitAttention | BeitAttention, block.attn).num_heads


def forward_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm model's ``forward_features(images)``: every timm model has one, but no typed base class declares it."""
    method = cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)
    return method(images)


def losses_on_fixed_batch(
    module: pl.LightningModule, batch: dict[str, torch.Tensor], steps: int, lr: float
) -> list[float]:
    """Trains ``module``'s trainable parameters with AdamW on one batch; the loss of every step."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = module.training_step(batch, 0)
        assert isinstance(loss, torch.Tensor)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- tiny modules
# The tiny method modules of the tests. Each factory's defaults are the arguments its method's own test
# file was written with; other tests pass overrides, so every test keeps the module (and the numbers
# its assertions were computed for) it had.


def tiny_tokenizer() -> VQTokenizer:
    """A 32-word VQ tokenizer that downsamples by 4: an 8x8 token grid at 32 px (CIM's frozen tokenizer)."""
    return VQTokenizer(vocab_size=32, code_dim=8, hidden_dim=16, num_res_blocks=1, downsample=4)


def tiny_conmim(**overrides: Any) -> ConMIMModule:
    """ConMIM on ``TINY_VIT_4X4`` (a BEiT) with a 64-32 projector; ``overrides`` replace any argument."""
    defaults: dict[str, Any] = dict(backbone_kwargs=TINY_VIT_4X4, proj_hidden_dim=64, proj_dim=32)
    return ConMIMModule(**{**defaults, **overrides})


def tiny_mocov3(**overrides: Any) -> MoCoV3Module:
    """MoCo v3 (MimCo stage 1) on ``TINY_VIT_4X4`` with a 64-16 projector; ``overrides`` replace any argument."""
    defaults: dict[str, Any] = dict(backbone_kwargs=TINY_VIT_4X4, proj_hidden_dim=64, proj_dim=16)
    return MoCoV3Module(**{**defaults, **overrides})


def tiny_mimco(**overrides: Any) -> MimCoModule:
    """MimCo stage 2 on ``TINY_VIT_4X4``; ``overrides`` replace any argument.

    The teacher is a random MoCo v3 ViT (``allow_random_teacher=True``) unless ``teacher_ckpt`` or
    ``teacher_arch`` names one.
    """
    named_teacher = "teacher_ckpt" in overrides or "teacher_arch" in overrides
    defaults: dict[str, Any] = dict(
        backbone_kwargs=TINY_VIT_4X4, allow_random_teacher=not named_teacher, patch_hidden_dim=32, proj_hidden_dim=64
    )
    return MimCoModule(**{**defaults, **overrides})


def tiny_cmae(**overrides: Any) -> CMAEModule:
    """CMAE on a ``TINY_VIT_8X8`` ViT-S, a one-block 32-wide decoder, a 64-16 projector; ``overrides`` replace any."""
    defaults: dict[str, Any] = dict(
        backbone="vit_small_patch16_224",
        backbone_kwargs=TINY_VIT_8X8,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        proj_hidden_dim=64,
        proj_dim=16,
    )
    return CMAEModule(**{**defaults, **overrides})


def tiny_cim(**overrides: Any) -> CIMModule:
    """CIM with a ``TINY_VIT_8X8`` ViT-S enhancer, a one-block generator and a fresh ``tiny_tokenizer()``.

    Block masking of 32 of the 64 tokens (blocks of at least 4) and a 4-px ResPix window.
    """
    defaults: dict[str, Any] = dict(
        enhancer="vit_small_patch16_224",
        enhancer_kwargs=TINY_VIT_8X8,
        tokenizer=tiny_tokenizer(),
        generator_kwargs={"depth": 1},
        masking=BlockMasking(8, num_masking_patches=32, min_num_patches=4),
        window=4,
    )
    return CIMModule(**{**defaults, **overrides})


def tiny_cim_resnet50(**overrides: Any) -> CIMModule:
    """CIM with a ResNet-50 enhancer at 64 px (ResNet inputs are multiples of 32 px): a 4x4 token grid.

    A 32-wide one-block generator, a fresh ``tiny_tokenizer()``, block masking of 8 of the 16 tokens.
    """
    defaults: dict[str, Any] = dict(
        enhancer="resnet50",
        image_size=64,
        tokenizer=tiny_tokenizer(),
        generator_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
        masking=BlockMasking(4, num_masking_patches=8, min_num_patches=2),
        window=4,
    )
    return CIMModule(**{**defaults, **overrides})


def tiny_vq_tokenizer(**overrides: Any) -> VQTokenizerModule:
    """VQ tokenizer training at 32 px with ``tiny_tokenizer()``'s sizes; ``overrides`` replace any argument."""
    defaults: dict[str, Any] = dict(
        vocab_size=32, code_dim=8, hidden_dim=16, num_res_blocks=1, downsample=4, image_size=32
    )
    return VQTokenizerModule(**{**defaults, **overrides})


#: A pre-training method module (what the export and diagnostics tests build).
PretrainingModule: TypeAlias = ConMIMModule | MoCoV3Module | MimCoModule | CMAEModule | CIMModule

#: The names ``tiny_method`` accepts.
TINY_METHODS = ("conmim", "mimco", "mocov3", "vq_tokenizer", "cim", "cmae")


def tiny_method(method: str, drop_path: float = 0.0) -> tuple[pl.LightningModule, nn.Module]:
    """A tiny 32-px instance of a method module and its teacher / target (what must agree across ranks).

    Every method trains with ``lr=1e-3``, no warm-up and (EMA methods) momentum 0.9, for the resume,
    DDP and FSDP tests that run each method the same way.

    Args:
        method: One of ``TINY_METHODS``.
        drop_path: The ViTs' drop path rate, which draws from the global random stream.

    Raises:
        ValueError: ``method`` is not one of ``TINY_METHODS``.
    """
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    vit = {**TINY_VIT_4X4, "drop_path_rate": drop_path}
    vit_8x8 = {**TINY_VIT_4X4, "patch_size": 4, "drop_path_rate": drop_path}  # 48 wide, unlike TINY_VIT_8X8
    module: pl.LightningModule
    teacher: nn.Module
    if method == "conmim":
        conmim = tiny_conmim(backbone_kwargs=vit, momentum=0.9, optim=optim)
        module, teacher = conmim, conmim.teacher
    elif method == "mimco":
        mimco = tiny_mimco(backbone_kwargs=vit, optim=optim)
        module, teacher = mimco, mimco.teacher
    elif method == "mocov3":
        moco = tiny_mocov3(backbone_kwargs=vit, momentum=0.9, optim=optim)
        module, teacher = moco, moco.momentum_branch
    elif method == "vq_tokenizer":
        vq = tiny_vq_tokenizer(optim=optim)
        module, teacher = vq, vq.tokenizer  # checksum of parameters and the EMA codebook buffers (below)
    elif method == "cim":
        cim = tiny_cim(enhancer_kwargs=vit_8x8, optim=optim)
        module, teacher = cim, cim.enhancer
    elif method == "cmae":
        cmae = tiny_cmae(backbone_kwargs=vit_8x8, momentum=0.9, optim=optim)
        module, teacher = cmae, cmae.target_encoder
    else:
        raise ValueError(f"tiny_method: unknown method {method!r}; expected one of {', '.join(TINY_METHODS)}")
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
