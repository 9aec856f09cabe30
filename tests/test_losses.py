"""Losses against the spec's closed forms and an independent loop implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.losses import info_nce, patch_contrastive_loss


def test_patch_contrast_closed_form_orthonormal() -> None:
    # q = k with orthonormal rows, N = 196: ln(1 + 195 e^-10) = 0.0088140
    basis = torch.eye(196)[None]  # (1, 196, 196)
    mask = torch.rand(1, 196) < 0.5
    loss = patch_contrastive_loss(basis, basis, mask, temperature=0.1)
    assert loss.item() == pytest.approx(math.log(1 + 195 * math.exp(-10)), abs=1e-6)
    assert loss.item() == pytest.approx(0.0088140, abs=1e-6)


def test_patch_contrast_closed_form_identical_features() -> None:
    features = torch.ones(2, 196, 8)
    mask = torch.ones(2, 196, dtype=torch.bool)
    assert patch_contrastive_loss(features, features, mask).item() == pytest.approx(math.log(196), abs=1e-5)
    assert math.log(196) == pytest.approx(5.27811, abs=1e-5)


def test_patch_contrast_matches_loop_and_ignores_unmasked() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 10, 6), torch.randn(3, 10, 6)
    mask = torch.rand(3, 10) < 0.4
    expected, count = 0.0, 0
    for b in range(3):
        for i in range(10):
            if mask[b, i]:
                q = F.normalize(student[b, i], dim=0)
                keys = F.normalize(teacher[b], dim=1)  # only this image's patches: intra-image
                logits = keys @ q / 0.2
                expected += -(logits[i] - torch.logsumexp(logits, 0)).item()
                count += 1
    loss = patch_contrastive_loss(student, teacher, mask, temperature=0.2)
    assert loss.item() == pytest.approx(expected / count, rel=1e-5)
    changed = student.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6)  # unmasked queries do not count
    assert patch_contrastive_loss(changed, teacher, mask, 0.2).item() == pytest.approx(loss.item(), rel=1e-6)


def test_patch_contrast_does_not_differentiate_teacher() -> None:
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, requires_grad=True)
    patch_contrastive_loss(student, teacher, torch.ones(2, 5, dtype=torch.bool)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_patch_contrast_fp32_under_bf16() -> None:
    student = torch.randn(2, 5, 4).bfloat16()
    loss = patch_contrastive_loss(student, student, torch.ones(2, 5, dtype=torch.bool))
    assert loss.dtype == torch.float32


def test_contrastive_logits_stay_float32_under_bf16_autocast() -> None:
    """Autocast runs matmuls in bf16 even on float32 inputs; the losses must not let it."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 49, 64), torch.randn(2, 49, 64)
    mask = torch.rand(2, 49) < 0.4
    q, k = torch.randn(32, 64, requires_grad=True), torch.randn(32, 64)
    reference = (patch_contrastive_loss(student, teacher, mask, 0.1), info_nce(q, k, 0.2))
    (grad_reference,) = torch.autograd.grad(reference[1], q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (patch_contrastive_loss(student, teacher, mask, 0.1), info_nce(q, k, 0.2))
    (grad_mixed,) = torch.autograd.grad(mixed[1], q)  # backward outside autocast, as Lightning runs it
    for ours, exact in zip(mixed, reference, strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, exact, rtol=1e-6, atol=1e-6)  # bf16 logits miss by ~1e-3
    torch.testing.assert_close(grad_mixed, grad_reference, rtol=1e-5, atol=1e-7)


def test_patch_contrast_shape_error() -> None:
    with pytest.raises(ValueError, match="expected student"):
        patch_contrastive_loss(torch.randn(2, 5, 4), torch.randn(2, 6, 4), torch.ones(2, 5, dtype=torch.bool))


def test_info_nce_against_manual_and_closed_form() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = qn @ kn.T / 0.2
    expected = -(logits.diag() - torch.logsumexp(logits, dim=1)).mean()
    assert info_nce(q, k, 0.2).item() == pytest.approx(expected.item(), rel=1e-6)
    assert info_nce(q, k, 0.2, gather=False).item() == pytest.approx(expected.item(), rel=1e-6)
    same = torch.ones(5, 3)
    assert info_nce(same, same, 0.5).item() == pytest.approx(math.log(5), abs=1e-6)


def test_info_nce_gradients_reach_both_sides() -> None:
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    info_nce(q, k, 0.1).backward()
    assert q.grad is not None and k.grad is not None
