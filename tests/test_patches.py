"""patchify / unpatchify: MAE's patch layout and its inverse."""

from __future__ import annotations

import torch

from lightning_mim.patches import patchify, unpatchify


def test_patchify_layout() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)  # (2, 4, 12)
    assert patches.shape == (2, 4, 12)
    # patch 1 (row 0, col 1), pixel (p=0, q=1), channel 2
    assert patches[0, 1, (0 * 2 + 1) * 3 + 2] == images[0, 2, 0, 3]


def test_unpatchify_inverts_patchify() -> None:
    x = torch.randn(2, 3, 16, 24)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (4, 6)), x)
