"""MFUMonitor counts the FLOPs of a real step and logs MFU against the given peak; compile=True trains."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from lightning_mim.callbacks import MFUMonitor
from lightning_mim.data import SampleDataModule

from .helpers import cpu_trainer, tiny_cmae


def test_mfu_monitor_measures_step_flops_and_logs_mfu(tmp_path) -> None:
    module = tiny_cmae(decoder_dim=16, proj_hidden_dim=32, proj_dim=256)  # 256: CMAE's default projection
    monitor = MFUMonitor(available_tflops=1.0, window_size=2)
    logger = CSVLogger(tmp_path)
    trainer = cpu_trainer(max_steps=4, limit_val_batches=0, callbacks=[monitor], log_every_n_steps=1, logger=logger)
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=64, val_size=8))
    # the counted FLOPs equal a forward + backward of the same step counted by hand
    torch.manual_seed(0)  # the trained module's initial weights
    reference = tiny_cmae(decoder_dim=16, proj_hidden_dim=32, proj_dim=256)
    batch = {"images": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)}
    batch["target_images"] = batch["images"]
    reference.log = lambda *a, **k: None  # type: ignore[method-assign]
    with FlopCounterMode(display=False) as counter:
        reference.training_step(batch, 0).backward()
    assert module.flops_per_batch == counter.get_total_flops() > 0
    assert monitor.available_flops == 10**12
    keys = set(trainer.logged_metrics)  # ThroughputMonitor logs straight to the loggers
    mfu = [k for k in keys if k.endswith("mfu")]
    assert mfu, keys
    value = float(trainer.logged_metrics[mfu[0]])
    assert 0.0 < value < 1.0


@pytest.mark.slow
def test_compile_trains_on_cpu() -> None:
    module = tiny_cmae(decoder_dim=16, proj_hidden_dim=32, proj_dim=256, compile=True)
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=16, val_size=8))
    assert getattr(module.online_encoder, "_compiled_call_impl", None) is not None
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    state = module.state_dict()
    assert "online_encoder.vit.blocks.0.attn.qkv.weight" in state  # checkpoint keys unchanged by compiling


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    batch = {"images": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}
    batch["target_images"] = batch["images"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same weights both times
        module = tiny_cmae(decoder_dim=16, proj_hidden_dim=32, proj_dim=256, grad_checkpointing=checkpointing)
        assert module.online_encoder.vit.grad_checkpointing is checkpointing
        assert not module.target_encoder.vit.grad_checkpointing  # the no-grad target is not recomputed
        module.log = lambda *a, **k: None  # type: ignore[method-assign]
        module.training_step(batch, 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.online_encoder.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
