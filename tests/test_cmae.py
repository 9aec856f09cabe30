"""CMAEModule (and MAE through it) on a tiny ViT: closed forms, visible-only encoding, target branch."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import torch
from torch import nn

from lightning_mim import CMAEModule
from lightning_mim.data import CMAEViews, SampleDataModule
from lightning_mim.losses import info_nce, masked_patch_mse
from lightning_mim.masking import BlockMasking, GridMasking, RandomMasking
from lightning_mim.nn import MAEDecoder, sincos_2d_pos_embed

from .helpers import cpu_trainer, flat, losses_on_fixed_batch, tiny_cmae


def batch(size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g)
    return {"images": images, "target_images": images.roll(1, dims=-1)}


def test_reconstruction_closed_form_zero_prediction() -> None:
    # predicted pixels all 0, per-patch normalised targets with unbiased variance: (D - 1) / D
    target = torch.rand(2, 196, 768) * 255
    loss = masked_patch_mse(torch.zeros_like(target), target, torch.ones(2, 196, dtype=torch.bool))
    assert loss.item() == pytest.approx(767 / 768, abs=1e-5)
    assert pytest.approx(0.998698, abs=1e-6) == 767 / 768


def test_reconstruction_counts_masked_patches_only() -> None:
    pred, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((pred - t) ** 2).mean(-1)[mask].mean()
    assert masked_patch_mse(pred, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    raw = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert masked_patch_mse(pred, target, mask, norm_pix=False).item() == pytest.approx(raw.item(), rel=1e-6)


def test_contrastive_closed_form_identical_features() -> None:
    # all s and t rows identical, global batch 8: 2 tau ln 8 = 0.14 ln 8
    same = torch.ones(8, 16)
    assert (2 * 0.07 * info_nce(same, same, 0.07)).item() == pytest.approx(0.291122, abs=1e-6)


def test_sincos_position_embedding_values() -> None:
    embed = sincos_2d_pos_embed((2, 3), 8, cls_token=True)  # (1, 7, 8)
    assert embed.shape == (1, 7, 8) and torch.equal(embed[0, 0], torch.zeros(8))
    # token for row 1, col 2: first half encodes the column, second half the row
    omega = [1.0, 0.01]
    col, row = 2.0, 1.0
    expected = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    expected += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    assert torch.allclose(embed[0, 1 + 1 * 3 + 2], torch.tensor(expected), atol=1e-6)


def test_default_structure_is_the_official_one() -> None:
    module = CMAEModule(decoder_depth=1, feature_decoder_depth=1)  # ViT-B/16 at 224
    assert isinstance(module.masking, GridMasking) and module.num_visible == 68
    vit = module.online_encoder.vit
    assert not vit.pos_embed.requires_grad
    # CMAE's table has the row index in the first half (as MoCo v3's), MAE's the column index
    assert module.hparams["pos_embed_order"] == "rows_first"
    assert torch.allclose(vit.pos_embed, sincos_2d_pos_embed((14, 14), 768, order="rows_first"))
    decoder_table = cast(MAEDecoder, module.pixel_decoder).pos_embed
    assert torch.allclose(decoder_table, sincos_2d_pos_embed((14, 14), 512, cls_token=False, order="rows_first"))
    mae = CMAEModule(contrastive_weight=0.0, decoder_depth=1)
    assert torch.allclose(mae.online_encoder.vit.pos_embed, sincos_2d_pos_embed((14, 14), 768))
    assert isinstance(module.target_encoder.vit.norm, nn.Identity) and isinstance(vit.norm, nn.LayerNorm)
    projector = cast(nn.Sequential, module.online_heads.projector)
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert projector[0].in_features == 768 and projector[3].bias is None
    assert projector[1].eps == 1e-6
    decoder = cast(MAEDecoder, module.pixel_decoder)
    assert decoder.head.out_features == 768 and decoder.embed.out_features == 512


def test_encoder_blocks_see_only_visible_tokens() -> None:
    module = tiny_cmae()
    seen: list[int] = []
    module.online_encoder.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    module.training_step(batch(), 0)
    # online encoder: 1 + visible; target encoder (a copy, not hooked) runs separately
    assert seen == [1 + module.num_visible] and module.num_visible == 64 - 44  # 11 of 16 cells masked


def test_target_branch_gets_no_gradients_and_decoders_are_not_averaged() -> None:
    module = tiny_cmae()
    module.training_step(batch(), 0).backward()
    assert all(p.grad is None for p in module.target_encoder.parameters())
    assert all(p.grad is None for p in module.target_projector.parameters())
    pairs = module.momentum_pairs()
    averaged = {id(p) for student, _ in pairs for p in student.parameters()}
    assert not any(id(p) in averaged for p in module.pixel_decoder.parameters())
    assert not any(id(p) in averaged for p in module.online_heads.feature_decoder.parameters())
    assert not any(id(p) in averaged for p in module.online_heads.predictor.parameters())


def test_target_moves_only_by_ema() -> None:
    dm = SampleDataModule(batch_size=8, num_workers=0, train_size=32, val_size=8, train_views=CMAEViews(32, shift=4))
    module = tiny_cmae(momentum=1.0)
    target0 = flat(module.target_encoder).clone()
    cpu_trainer(max_steps=3, limit_val_batches=0).fit(module, dm)
    assert torch.equal(flat(module.target_encoder), target0)  # momentum 1: frozen while the encoder trains
    module = tiny_cmae(momentum=0.0)
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(module, dm)
    online = dict(module.online_encoder.named_parameters())
    for name, param in module.target_encoder.named_parameters():
        assert torch.equal(param, online[name]), name  # momentum 0: a copy of the online encoder
    assert torch.equal(flat(module.target_projector), flat(module.online_heads.projector))


def test_logs_both_terms_and_learns_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    module = tiny_cmae()
    data = batch(16)
    losses = losses_on_fixed_batch(module, data, steps=25, lr=2e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def test_mae_mode_builds_no_target_branch() -> None:
    module = tiny_cmae(contrastive_weight=0.0, masking=RandomMasking(8, 0.75))
    assert not hasattr(module, "target_encoder") and not hasattr(module, "online_heads")
    assert module.momentum_pairs() == [] and module.configure_callbacks() == []
    assert type(module.train_views()).__name__ == "MAEViews"
    loss = module.training_step({"images": batch()["images"]}, 0)
    assert loss.isfinite()


def test_invalid_configurations() -> None:
    with pytest.raises(ValueError, match=r"masks a varying number of patches; the encoder drops the masked ones"):
        tiny_cmae(masking=BlockMasking(8, 20, 4))
    with pytest.raises(ValueError, match="does not match"):
        tiny_cmae(masking=GridMasking(14, 2, 0.65))
    with pytest.raises(ValueError, match="not a CMAE checkpoint"):
        tiny_cmae().on_load_checkpoint({"lightning_mim": {"method": "conmim"}})


def test_pixel_shifted_views() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    views = CMAEViews(size=32, shift=4, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    for _ in range(5):
        out = views(image)
        online, target = out["images"], out["target_images"]
        assert online.shape == target.shape == (3, 32, 32)
        # without colour augmentation the target is the online view shifted by (dy, dx) < 4
        found = any(
            torch.equal(online[:, dy:, dx:], target[:, : 32 - dy, : 32 - dx]) for dy in range(4) for dx in range(4)
        )
        assert found


def test_a_checkpoint_from_before_the_online_encoder_rename_loads(tmp_path) -> None:
    module = tiny_cmae()
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    assert any(k.startswith("online_encoder.") for k in state)
    # 0.2 named the online encoder "encoder"
    checkpoint["state_dict"] = {
        ("encoder." + k[len("online_encoder.") :] if k.startswith("online_encoder.") else k): v
        for k, v in state.items()
    }
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = CMAEModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in module.state_dict().items())
    assert restored.encoder() is restored.online_encoder.vit
    assert restored.encoder("teacher") is restored.target_encoder.vit


def test_a_checkpoint_with_the_other_table_layout_is_followed(tmp_path) -> None:
    # before pos_embed_order, CMAE built MAE's layout (columns first); such a checkpoint records no order
    module = tiny_cmae(pos_embed_order="columns_first").eval()
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    del checkpoint["hyper_parameters"]["pos_embed_order"]
    module.on_save_checkpoint(checkpoint)
    checkpoint["pytorch-lightning_version"] = "2.6.0"
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match=r"table is 'columns_first', this module was built with .*'rows_first'"):
        restored = CMAEModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True).eval()
    assert restored.pos_embed_order == restored.hparams["pos_embed_order"] == "columns_first"
    images, mask = torch.randn(2, 3, 32, 32), module.masking(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = module.online_encoder(images, mask, num_visible=module.num_visible)
        torch.testing.assert_close(restored.pixel_decoder(tokens, mask), module.pixel_decoder(tokens, mask))
        features = restored.online_heads.feature_decoder(tokens, mask)
        torch.testing.assert_close(features, module.online_heads.feature_decoder(tokens, mask))
