"""CIM's tokenizers: EMA vector quantiser maths, VQ tokenizer training and loading, DALL-E loading rules."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mim import VQTokenizerModule
from lightning_mim.data import SampleDataModule
from lightning_mim.data.datamodule import load_sample
from lightning_mim.methods.tokenizer import load_vq_tokenizer, psnr
from lightning_mim.nn import DALLETokenizer, VQTokenizer
from lightning_mim.nn.tokenizer import EMAVectorQuantizer
from lightning_mim.optim import OptimConfig

from .helpers import cpu_trainer

TINY = dict(vocab_size=64, code_dim=8, hidden_dim=32, num_res_blocks=1, downsample=4)


def quantize(q: EMAVectorQuantizer, values: list[float]) -> torch.Tensor:
    z = torch.tensor(values).view(1, 1, 1, -1)  # (B, dim=1, h=1, w)
    return q(z)[1].flatten()


def test_ema_codebook_update_by_hand() -> None:
    q = EMAVectorQuantizer(num_codes=2, dim=1, decay=0.5, dead_threshold=1.0)
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    # step 1: ids [0, 0, 1]; counts 0.5 * [2, 1] = [1, 0.5], sums 0.5 * [3, 9] = [1.5, 4.5]
    # bias-corrected usage [1, 0.5] / (1 - 0.5) = [2, 1] >= 1: both kept, codes = sums / counts
    assert quantize(q, [1.0, 2.0, 9.0]).tolist() == [0, 0, 1]
    assert torch.allclose(q.counts, torch.tensor([1.0, 0.5]))
    assert torch.allclose(q.codebook.flatten(), torch.tensor([1.5, 9.0]))
    # step 2: ids [1, 1]; counts [0.5, 0.25 + 1] = [0.5, 1.25], sums [0.75, 2.25 + 10] = [0.75, 12.25]
    # usage [0.5, 1.25] / 0.75 = [0.67, 1.67]: entry 0 is dead and restarts from a batch vector
    assert quantize(q, [9.0, 11.0]).tolist() == [1, 1]
    assert q.codebook[1].item() == pytest.approx(12.25 / 1.25)
    assert q.codebook[0].item() in (9.0, 11.0)
    # eval mode: the codebook is fixed
    q.eval()
    before = q.codebook.clone()
    quantize(q, [100.0, -100.0])
    assert torch.equal(q.codebook, before)


def test_first_batch_restarts_unused_entries_from_its_own_vectors() -> None:
    torch.manual_seed(0)
    q = EMAVectorQuantizer(num_codes=16, dim=4)
    z = torch.randn(2, 4, 3, 3) + 50.0  # far from the random initial codebook
    q(z)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 4)
    distances = torch.cdist(q.codebook, vectors).min(dim=1).values
    used = q.counts > 0
    assert torch.all(distances[~used] == 0)  # restarted entries are batch vectors
    assert used.sum() >= 1


def test_straight_through_gradient_and_commitment() -> None:
    q = EMAVectorQuantizer(num_codes=4, dim=2).eval()
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    quantized, ids, commitment = q(z)
    expected_q = q.codebook[ids.flatten()].view(1, 2, 2, 2).permute(0, 3, 1, 2)
    assert torch.allclose(quantized, expected_q)
    assert commitment.item() == pytest.approx(F.mse_loss(z, expected_q).item(), rel=1e-6)
    (grad,) = torch.autograd.grad((quantized * torch.arange(8.0).view(1, 2, 2, 2)).sum(), z)
    assert torch.equal(grad, torch.arange(8.0).view(1, 2, 2, 2))  # identity through the quantiser


def test_vq_tokenizer_shapes_and_consistency() -> None:
    torch.manual_seed(0)
    tokenizer = VQTokenizer(**TINY).eval()
    images = torch.rand(2, 3, 32, 24)
    ids = tokenizer.encode(images)
    assert ids.shape == (2, 8, 6) and ids.dtype == torch.long and int(ids.max()) < 64
    decoded = tokenizer.decode(ids)
    assert decoded.shape == (2, 3, 32, 24) and decoded.min() >= 0 and decoded.max() <= 1
    _, forward_ids, _ = tokenizer(images)
    assert torch.equal(forward_ids, ids)
    with pytest.raises(ValueError, match="divisible"):
        tokenizer.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="power of 2"):
        VQTokenizer(downsample=6)


def test_psnr_closed_form() -> None:
    images = torch.zeros(2, 3, 4, 4)
    assert psnr(images + 0.1, images).item() == pytest.approx(20.0, abs=1e-4)  # -10 log10(0.01)
    assert psnr(images + 0.01, images).item() == pytest.approx(40.0, abs=1e-3)


def test_tokenizer_training_raises_psnr_and_uses_the_codebook(tmp_path: Path) -> None:
    torch.manual_seed(0)
    optim = OptimConfig(lr=3e-3, base_batch_size=None, weight_decay=0.0, warmup_steps=5)
    module = VQTokenizerModule(**TINY, image_size=32, crop_scale=(0.35, 1.0), optim=optim)
    data = SampleDataModule(batch_size=32, num_workers=0, train_size=2048, val_size=64)
    val = load_sample("test")[0][:64]

    def val_psnr() -> float:
        module.eval()
        with torch.no_grad():
            x = val.float() / 255
            return psnr(module.tokenizer.decode(module.tokenizer.encode(x)), x).item()

    before = val_psnr()
    module.train()  # Lightning keeps the train/eval mode a module arrives with
    trainer = cpu_trainer(
        max_steps=80,
        limit_val_batches=1,
        val_check_interval=80,
        check_val_every_n_epoch=None,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    after = val_psnr()
    assert after > before + 3.0, (before, after)
    metrics = trainer.callback_metrics
    assert 0.0 < metrics["train/codebook_usage"].item() <= 1.0
    assert metrics["train/psnr"].item() > 10.0 and torch.isfinite(metrics["val/psnr"])
    # the checkpoint round trip gives the trained tokenizer, frozen
    path = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_vq_tokenizer(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ref = module.tokenizer.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_loading_refuses_bad_files_and_never_unpickles(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vq_tokenizer"):
        load_vq_tokenizer(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_vq_tokenizer(tmp_path / "junk.ckpt")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Malicious(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_vq_tokenizer(tmp_path / "evil.ckpt")
    assert not marker.exists()


class _Malicious:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ------------------------------------------------------------------------------------- DALL-E
class FakeDalleEncoder(nn.Module):
    """DALL-E's encoder interface: (B, 3, H, W) mapped pixels -> (B, V, H/8, W/8) logits."""

    vocab_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (F.avg_pool2d(x[:, :1], 8) - 0.1) / 0.8 * 15  # undo the pixel mapping, scale to ids
        return -((level - torch.arange(16.0).view(1, 16, 1, 1)) ** 2)


class FakeDalleDecoder(nn.Module):
    """DALL-E's decoder interface: one-hot (B, V, h, w) -> (B, 6, 8h, 8w) statistics (logits first)."""

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        value = (one_hot.argmax(dim=1, keepdim=True).float() / 15) * 0.8 + 0.1  # mapped pixel value
        logit = torch.log(value / (1 - value))
        return F.interpolate(logit, scale_factor=8).expand(-1, 6, -1, -1)


def _save_fakes(tmp_path: Path) -> tuple[Path, Path]:
    enc, dec = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    torch.save(FakeDalleEncoder(), enc)
    torch.save(FakeDalleDecoder(), dec)
    return enc, dec


def test_dalle_files_are_not_unpickled_without_opt_in(tmp_path: Path) -> None:
    enc, dec = _save_fakes(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle"):
        DALLETokenizer(enc, dec)
    with pytest.raises(FileNotFoundError, match=r"missing\.pkl"):
        DALLETokenizer(tmp_path / "missing.pkl", dec, allow_pickle=True)


def test_dalle_tokenizer_maps_pixels_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    enc, dec = _save_fakes(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "dall_e" else real_find_spec(name)
    )
    tokenizer = DALLETokenizer(enc, dec, allow_pickle=True)
    assert tokenizer.vocab_size == 16 and tokenizer.downsample == 8
    levels = torch.tensor([[0, 5], [9, 15]], dtype=torch.float) / 15  # one grey level per 8x8 cell
    images = F.interpolate(levels.view(1, 1, 2, 2), scale_factor=8).expand(1, 3, 16, 16)
    ids = tokenizer.encode(images)
    assert ids.tolist() == [[[0, 5], [9, 15]]]
    assert torch.allclose(tokenizer.decode(ids), images, atol=1e-5)
    assert math.isclose(tokenizer.decode(ids).max().item(), 1.0, abs_tol=1e-5)
