"""Image kernels (lightning_mim.data.kernels): the same results as torchvision's operations."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from lightning_mim.data.kernels import ColorJitter, GaussianBlur, adjust_hue


@pytest.mark.parametrize("kernel, sigma", [(23, 1.7), (3, 0.4), (9, 2.0)])
def test_separable_blur_matches_torchvision(kernel: int, sigma: float) -> None:
    image = torch.randint(0, 256, (3, 40, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = GaussianBlur(kernel, (sigma, sigma))(image)
    reference = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    assert ours.dtype == torch.uint8 and ours.shape == image.shape
    assert (ours.int() - reference.int()).abs().max() <= 1  # float rounding before the uint8 cast
    assert (ours != reference).float().mean() < 0.01


@pytest.mark.parametrize("hue", [0.0, 0.05, -0.1, 0.3, -0.5, 0.5])
def test_adjust_hue_matches_torchvision(hue: float) -> None:
    image = torch.rand(3, 31, 29, generator=torch.Generator().manual_seed(1))
    image[:, 1, 0] = torch.tensor([1.0, 1.0, 0.0])  # R == G max
    image[:, 1, 1] = torch.tensor([0.2, 1.0, 1.0])  # G == B max
    image[:, 1, 2] = torch.tensor([1.0, 0.3, 1.0])  # R == B max
    image[:, 1, 3] = 0.5  # gray: no chroma
    torch.testing.assert_close(adjust_hue(image, hue), TF.adjust_hue(image, hue), atol=1e-5, rtol=0)


def test_color_jitter_matches_torchvision_ops() -> None:
    image = torch.randint(0, 256, (3, 40, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [1.3, 0.7, 1.15, -0.08]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        expected = image.float() / 255
        for i in order:
            expected = reference_ops[i](expected, factors[i])
        ours = ColorJitter.apply(image.float() / 255, order, list(factors))
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    # the random parameters: a permutation, factors within torchvision's ranges
    jitter = ColorJitter(0.4, 0.4, 0.2, 0.1)
    torch.manual_seed(0)
    draws = [jitter.sample() for _ in range(200)]
    assert all(sorted(order) == [0, 1, 2, 3] for order, _ in draws)
    for i, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        values = torch.tensor([f[i] for _, f in draws])
        assert low <= values.min() and values.max() <= high and values.max() - values.min() > 0.8 * (high - low)
    assert ColorJitter(0.4, 0.0, 0.0, 0.0).sample()[1][1:] == [None, None, None]
    out = jitter(image)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.7)


def test_kernels_stay_importable_from_views() -> None:
    from lightning_mim.data import views

    assert (views.ColorJitter, views.GaussianBlur, views.adjust_hue) == (ColorJitter, GaussianBlur, adjust_hue)
