"""CIMModule: window normalisation, token sampling, RevDet labels, gradient isolation, frozen tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.data import SampleDataModule
from lightning_mim.losses import window_normalize
from lightning_mim.masking import BlockMasking
from lightning_mim.methods.cim import sample_tokens
from lightning_mim.nn import VQTokenizer

from .helpers import TINY_VIT_8X8, cpu_trainer, losses_on_fixed_batch, tiny_cim, tiny_cim_resnet50, tiny_cmae


def images(size: int = 8, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------ window_normalize
def reference_window_normalize(x: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """Per pixel: its own reflect-padded k x k window, mean and population variance (unfold)."""
    b = (k - 1) // 2  # k // 2 - 1 for even k (the spec)
    padded = F.pad(x.double(), (b, k // 2, b, k // 2), mode="reflect")
    windows = padded.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H, W, k, k)
    mean = windows.mean(dim=(-1, -2))
    var = windows.var(dim=(-1, -2), unbiased=False)
    return ((x.double() - mean) / (var + eps).sqrt()).float()


@pytest.mark.parametrize("k", [8, 4, 3])
def test_window_normalize_matches_an_independent_computation(k: int) -> None:
    x = torch.rand(2, 3, 20, 17) * 4 - 1
    assert torch.allclose(window_normalize(x, k), reference_window_normalize(x, k), atol=1e-4)


def test_window_normalize_statistics_of_each_window() -> None:
    """Zero mean and unit variance over a pixel's window, with that pixel at offset k//2 - 1."""
    torch.manual_seed(0)
    k = 8
    x = torch.randn(1, 1, 24, 24) * 3 + 5
    out = window_normalize(x, k)
    padded = F.pad(x, (k // 2 - 1, k // 2, k // 2 - 1, k // 2), mode="reflect")
    for i, j in [(0, 0), (5, 9), (23, 23), (12, 0)]:
        window = padded[0, 0, i : i + k, j : j + k].double()
        normed = (window - window.mean()) / (window.var(unbiased=False) + 1e-6).sqrt()
        assert normed.mean().item() == pytest.approx(0.0, abs=1e-9)
        assert normed.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
        # the output at (i, j) is the pixel's value in its own normalised window
        assert out[0, 0, i, j].item() == pytest.approx(normed[k // 2 - 1, k // 2 - 1].item(), abs=1e-4)


def test_window_normalize_is_affine_invariant_and_flat_images_give_zero() -> None:
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(window_normalize(x * 50 + 7), window_normalize(x), atol=1e-3)
    assert torch.equal(window_normalize(torch.full((1, 3, 16, 16), 0.3)), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="window"):
        window_normalize(x, window=1)


# --------------------------------------------------------------------------------- sampling
def test_samples_follow_the_softmax_at_the_temperature() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n = 100_000
    ids, mask = torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for t in (1.0, 0.5):
        counts = torch.bincount(sample_tokens(logits.expand(1, n, 4), ids, mask, t, g).flatten(), minlength=4)
        expected = torch.softmax(logits / t, dim=0)
        assert torch.allclose(counts / n, expected, atol=0.01)


def test_revdet_labels_count_a_sample_equal_to_the_original_as_original() -> None:
    vocab, n = 6, 10
    ids = torch.arange(n).remainder(vocab).view(1, n)
    mask = torch.tensor([[True, False] * (n // 2)])
    certain_original = F.one_hot(ids, vocab).float() * 1e4  # all mass on the original id
    corrupted = sample_tokens(certain_original, ids, mask, 1.0)
    assert torch.equal(corrupted, ids) and not (corrupted != ids).any()  # masked, yet labelled original
    certain_other = F.one_hot((ids + 1) % vocab, vocab).float() * 1e4
    corrupted = sample_tokens(certain_other, ids, mask, 1.0)
    assert torch.equal(corrupted != ids, mask)  # replaced exactly where masked
    assert torch.equal(corrupted[~mask], ids[~mask])


def test_revdet_loss_uses_the_replacement_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    module = tiny_cim(objective="revdet").eval()
    x = images(4)
    mask = module.masking(4, generator=torch.Generator().manual_seed(1))
    # make the generator certain of the original ids: nothing is replaced, all labels are 0
    with torch.no_grad():
        small = F.interpolate(x.float() / 255, size=module.tokenizer_size, mode="bilinear", antialias=True)
        ids = module.tokenizer.encode(small).flatten(1)

    def certain(images_: torch.Tensor, mask_: torch.Tensor) -> torch.Tensor:
        return F.one_hot(ids, module.tokenizer.vocab_size).float() * 1e4

    monkeypatch.setattr(module.generator, "forward", certain)
    result = module.compute_losses(x, mask, torch.Generator().manual_seed(0))
    assert result.metrics["replaced_frac"].item() == 0.0
    output = result.outputs["output"]
    expected = F.binary_cross_entropy_with_logits(output, torch.zeros_like(output))
    assert result.terms["loss_enh"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert result.metrics["gen_accuracy"].item() == 1.0


# ------------------------------------------------------------------------- gradient isolation
@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_enhancer_loss_sends_no_gradient_to_the_generator(objective: str) -> None:
    module = tiny_cim(objective=objective)
    mask = module.masking(4, generator=torch.Generator().manual_seed(0))
    terms = module.compute_losses(images(4), mask, torch.Generator().manual_seed(0)).terms
    generator_params = list(module.generator.parameters())
    enhancer_params = list(module.enhancer.parameters())
    from_enhancer = torch.autograd.grad(terms["loss_enh"], generator_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in from_enhancer)
    from_generator = torch.autograd.grad(terms["loss_gen"], enhancer_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in from_generator)
    grads = torch.autograd.grad(terms["loss_gen"], generator_params, allow_unused=True)
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0


def test_generator_loss_is_cross_entropy_over_masked_tokens_only() -> None:
    module = tiny_cim().eval()
    x = images(2)
    mask = module.masking(2, generator=torch.Generator().manual_seed(3))
    terms = module.compute_losses(x, mask, torch.Generator().manual_seed(0)).terms
    with torch.no_grad():
        small = F.interpolate(x.float() / 255, size=module.tokenizer_size, mode="bilinear", antialias=True)
        ids = module.tokenizer.encode(small).flatten(1)
        from lightning_mim.data import normalize

        logits = module.generator(normalize(x), mask)
    expected = F.cross_entropy(logits[mask], ids[mask])
    assert terms["loss_gen"].item() == pytest.approx(expected.item(), rel=1e-5)
    # at initialisation the generator is close to uniform over the vocabulary
    assert terms["loss_gen"].item() == pytest.approx(math.log(module.tokenizer.vocab_size), rel=0.2)


# ------------------------------------------------------------------------------ configuration
def test_a_tokenizer_is_required() -> None:
    with pytest.raises(ValueError, match="tokenizer_ckpt"):
        tiny_cim(tokenizer=None)
    with pytest.raises(FileNotFoundError, match="vq_tokenizer"):
        tiny_cim(tokenizer=None, tokenizer_ckpt="/nonexistent/last.ckpt")
    module = tiny_cim(tokenizer=None, allow_random_tokenizer=True, generator_kwargs={"depth": 1})
    assert isinstance(module.tokenizer, VQTokenizer) and module.tokenizer_size == 8 * 8


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(ValueError, match="temperature"):
        tiny_cim(temperature=0.0)
    with pytest.raises(ValueError, match="objective"):
        tiny_cim(objective="inpaint")
    with pytest.raises(ValueError, match=r"its grid \(14, 14\) does not match the token grid \(8, 8\)"):
        tiny_cim(masking=BlockMasking(14))
    with pytest.raises(TypeError, match="ViT, BEiT or ResNet"):
        tiny_cim(enhancer="convnext_tiny", enhancer_kwargs={})
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_cim(enhancer="resnet18", enhancer_kwargs={}, image_size=48)


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_vit_enhancer_learns_on_a_fixed_batch(objective: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = tiny_cim(objective=objective)
    batch = {"images": images(8)}
    module.masking = BlockMasking(8, num_masking_patches=32, min_num_patches=4)
    mask = module.masking(8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(module, "masking", lambda n, device=None, generator=None: mask)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    losses = losses_on_fixed_batch(module, batch, steps=15, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_resnet50_enhancer_trains_both_objectives(objective: str) -> None:
    torch.manual_seed(0)
    module = tiny_cim_resnet50(objective=objective)
    assert module.enhancer.grid_size == (4, 4) and module.tokenizer_size == 16
    out = module.enhancer(torch.randn(2, 3, 64, 64))
    assert out.shape == ((2, 16) if objective == "revdet" else (2, 3, 64, 64))
    before = {k: v.clone() for k, v in module.enhancer.state_dict().items()}
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4))
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_gen", "train/loss_enh", "train/gen_accuracy", "train/replaced_frac"):
        assert torch.isfinite(metrics[key]), key
    assert torch.allclose(metrics["train/loss"], metrics["train/loss_gen"] + metrics["train/loss_enh"], atol=1e-4)
    conv1 = module.enhancer.state_dict()["backbone.conv1.weight"]
    assert not torch.equal(conv1, before["backbone.conv1.weight"])


def test_tokenizer_stays_frozen_through_training() -> None:
    module = tiny_cim()
    tokenizer_before = {k: v.clone() for k, v in module.tokenizer.state_dict().items()}
    generator_before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    trainer = cpu_trainer(max_steps=3, limit_val_batches=1, val_check_interval=3)
    trainer.fit(module, SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8))
    assert not module.tokenizer.training and module.generator.training
    assert all(not p.requires_grad for p in module.tokenizer.parameters())
    after = module.tokenizer.state_dict()
    assert all(torch.equal(tokenizer_before[k], after[k]) for k in after)  # weights and codebook buffers
    assert any(not torch.equal(generator_before[k], v) for k, v in module.generator.state_dict().items())
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in module.tokenizer.parameters()}
    assert torch.isfinite(trainer.callback_metrics["val/loss_enh"])


def test_checkpoint_of_another_method_is_refused(tmp_path) -> None:
    other = tiny_cmae(decoder_dim=16, proj_hidden_dim=1536, proj_dim=256)  # CMAE's default projector
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(other, SampleDataModule(batch_size=4, num_workers=0, train_size=4, val_size=4))
    trainer.save_checkpoint(tmp_path / "cmae.ckpt")
    with pytest.raises(ValueError, match="not a CIM checkpoint"):
        tiny_cim().on_load_checkpoint(torch.load(tmp_path / "cmae.ckpt", weights_only=True))
    with pytest.raises(ValueError, match="not a VQ tokenizer checkpoint"):
        tiny_cim(tokenizer=None, tokenizer_ckpt=str(tmp_path / "cmae.ckpt"))


def test_encoder_is_the_enhancer_backbone_only() -> None:
    module = tiny_cim()
    keys = set(module.encoder().state_dict())
    assert keys and not any(k.startswith(("head", "generator", "tokenizer")) for k in keys)
    import timm

    reference = timm.create_model("vit_small_patch16_224", num_classes=0, init_values=0.1, **TINY_VIT_8X8)
    assert keys == set(reference.state_dict())
