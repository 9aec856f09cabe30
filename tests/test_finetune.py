"""Fine-tuning and linear probing: weights arrive intact, the protocol's parts are wired, metrics move."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn

from lightning_mim import ConMIMModule, FineTuneModule, LinearProbeModule
from lightning_mim.checkpoint.weights import load_encoder
from lightning_mim.data import SampleDataModule, load_sample
from lightning_mim.data.views import normalize
from lightning_mim.export import to_timm
from lightning_mim.optim import OptimConfig

from .helpers import TINY_VIT_4X4, cpu_trainer, losses_on_fixed_batch, tiny_conmim


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ConMIMModule]:
    """A tiny ConMIM checkpoint after a few steps, and its export folder."""
    tmp = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    module = tiny_conmim(proj_hidden_dim=32, proj_dim=16)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=16, val_size=8))
    ckpt = tmp / "conmim.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, to_timm(ckpt, tmp / "export"), module


def data() -> SampleDataModule:
    return SampleDataModule(batch_size=64, num_workers=0, train_size=512, val_size=200)


def test_encoder_weights_arrive_intact_and_the_head_is_new(pretrained) -> None:
    ckpt, export, module = pretrained
    teacher = module.encoder("teacher").state_dict()
    for source in (ckpt, export):
        model = load_encoder(str(source), global_pool="avg", num_classes=10)
        state = model.state_dict()
        shared = [k for k in teacher if k in state]
        assert len(shared) >= len(teacher) - 2  # all but the final norm, unused under mean pooling
        assert all(torch.equal(state[k], teacher[k]) for k in shared)
        assert model.num_classes == 10 and "fc_norm.weight" in state
    # No pooling given: the export's own, the monitored features (final norm on every token, mean).
    monitored = load_encoder(str(export), num_classes=0).eval()
    assert "norm.weight" in monitored.state_dict() and "fc_norm.weight" not in monitored.state_dict()
    module.eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(monitored(normalize(pixels, module.mean, module.std)), module.embed(pixels), atol=1e-5)
    random = load_encoder(str(export), random_init=True, global_pool="avg", num_classes=10)
    assert not torch.equal(random.state_dict()["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])


def test_bad_weights_fail_clearly(pretrained, tmp_path: Path) -> None:
    _, export, _ = pretrained
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder(str(export), model_kwargs={"embed_dim": 64, "num_heads": 2})
    with pytest.raises(ValueError, match="give `arch`"):
        load_encoder(None)


def test_linear_probe_trains_only_the_head(pretrained) -> None:
    """Under the Trainer the encoder stays frozen and only the head moves, with LARS; on a fixed batch
    the head fits the frozen features (the loss falls).

    Held-out accuracy is not tested here: this encoder has seen 2 steps of pre-training and a 3-epoch
    probe on it lands at chance (8-13% over seeds); the linear quickstart measures real accuracies.
    """
    _, export, _ = pretrained
    torch.manual_seed(0)
    optim = OptimConfig(lr=1.0, base_batch_size=None, min_lr=0.0, weight_decay=0.0, warmup_steps=2)
    module = LinearProbeModule(str(export), num_classes=10, pool="mean", image_size=32, optim=optim)
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    linear = cast(nn.Linear, module.head[1])  # after the BatchNorm
    head_before = linear.weight.clone()
    trainer = cpu_trainer(max_epochs=1, check_val_every_n_epoch=1)
    trainer.fit(module, data())
    assert all(torch.equal(v, encoder_before[k]) for k, v in module.encoder.state_dict().items())
    assert not module.encoder.training and not torch.equal(linear.weight, head_before)
    assert type(trainer.optimizers[0]).__name__ == "Lars"
    top1 = trainer.callback_metrics["val/top1"].item()
    assert 0.0 <= top1 <= 1.0 and trainer.callback_metrics["val/top5"].item() >= top1

    images, labels, _ = load_sample("train")
    batch = {"images": images[:64], "labels": labels[:64]}
    module.trainer = None  # a plain module again: self.log does nothing
    losses = losses_on_fixed_batch(module, batch, steps=40, lr=1e-2)  # AdamW on the trainable head only
    assert losses[-1] < 0.8 * losses[0], losses  # 2.24 -> 1.59 here
    assert all(torch.equal(v, encoder_before[k]) for k, v in module.encoder.state_dict().items())


def test_finetune_uses_layer_decay_and_learns(pretrained) -> None:
    ckpt, _, _ = pretrained
    torch.manual_seed(0)
    optim = OptimConfig(lr=2e-3, base_batch_size=None, min_lr=1e-6, warmup_steps=2, layer_decay=0.65)
    module = FineTuneModule(
        str(ckpt), num_classes=10, image_size=32, mixup=0.8, cutmix=1.0, random_erasing=0.25, optim=optim
    )
    trainer = cpu_trainer(max_epochs=2, check_val_every_n_epoch=2)
    trainer.fit(module, data())
    lrs = sorted({round(g["initial_lr"], 8) for g in trainer.optimizers[0].param_groups})
    assert len(lrs) >= 3 and lrs[-1] == pytest.approx(2e-3)  # one lr per depth, the head's the largest
    # timm's layer decay: embeddings at 0.65^(depth + 1), each block one power less, the head at 1
    assert lrs[0] == pytest.approx(2e-3 * 0.65 ** (TINY_VIT_4X4["depth"] + 1), rel=1e-6)
    top1 = trainer.callback_metrics["val/top1"].item()
    assert 0.12 < top1 <= 1.0, top1


def test_finetune_without_mixup_and_lamb_option(pretrained) -> None:
    _, export, _ = pretrained
    module = FineTuneModule(
        str(export), num_classes=10, image_size=32, mixup=0.0, cutmix=0.0, optimizer="lamb", randaugment=None
    )
    batch = {"images": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), "labels": torch.arange(6)}
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=0.3)  # near-uniform start
    with pytest.raises(ValueError, match="optimizer"):
        FineTuneModule(str(export), num_classes=10, optimizer="sgd")  # type: ignore[arg-type]
