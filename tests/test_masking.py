"""Mask generators: counts, shapes, determinism, and BEiT's block-masking distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_mim.masking import BlockMasking, GridMasking, MaskGenerator, RandomMasking, num_masked_for_ratio


def beit_block_mask_reference(
    rng: random.Random, height: int, width: int, num_masking: int, min_num: int
) -> list[list[int]]:
    """BEiT's sequential algorithm, written from its description, for comparing distributions."""
    max_num = num_masking
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = [[0] * width for _ in range(height)]
    count = 0
    while count < num_masking:
        budget = min(num_masking - count, max_num)
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_num, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                already = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - already <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@pytest.mark.parametrize(
    "masking",
    [BlockMasking(14, 75), RandomMasking(14, 0.75), GridMasking(14, 2, 0.75)],
    ids=["block", "random", "grid"],
)
def test_shape_dtype_protocol_and_determinism(masking: MaskGenerator) -> None:
    assert isinstance(masking, MaskGenerator)
    a = masking(8, generator=torch.Generator().manual_seed(3))
    b = masking(8, generator=torch.Generator().manual_seed(3))
    c = masking(8, generator=torch.Generator().manual_seed(4))
    assert a.shape == (8, 196) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert masking(2, device="meta").device.type == "meta"


def test_random_masking_count_and_uniformity() -> None:
    masking = RandomMasking(14, 0.75)
    masks = masking(4000, generator=torch.Generator().manual_seed(0))
    assert num_masked_for_ratio(196, 0.75) == 196 - int(196 * 0.25) == 147
    assert (masks.sum(1) == 147).all()
    frequency = masks.float().mean(0)  # each position masked with probability 147/196
    assert torch.allclose(frequency, torch.full_like(frequency, 147 / 196), atol=0.03)


def test_grid_masking_cells() -> None:
    masking = GridMasking(14, cell_size=2, mask_ratio=0.65)
    masks = masking(64, generator=torch.Generator().manual_seed(0)).view(64, 7, 2, 7, 2)
    assert (masks.sum(dim=(1, 2, 3, 4)) == 128).all()  # 32 of 49 cells: 68 visible (CMAE)
    cells = masks.permute(0, 1, 3, 2, 4).reshape(64, 49, 4)
    assert (cells.all(-1) | ~cells.any(-1)).all()  # every 2x2 cell all masked or all visible
    assert GridMasking(14, 2, 0.75).num_masking_patches == 148  # SimMIM mps32: 37 cells


def test_block_masking_matches_beit_distribution() -> None:
    n = 3000
    ours = BlockMasking(14, 75, 16)(n, generator=torch.Generator().manual_seed(0)).view(n, 14, 14).float()
    rng = random.Random(0)
    ref = torch.tensor([beit_block_mask_reference(rng, 14, 14, 75, 16) for _ in range(n)], dtype=torch.float)
    assert ours.sum((1, 2)).max() <= 75
    # Mean masked count and its spread agree with the sequential reference.
    assert abs(ours.sum((1, 2)).mean() - ref.sum((1, 2)).mean()) < 1.0
    assert abs(ours.sum((1, 2)).std() - ref.sum((1, 2)).std()) < 1.0
    # Spatial profile: centre patches are masked more often than corners, the same amount in both.
    assert torch.allclose(ours.mean(0), ref.mean(0), atol=0.05)


def test_block_masking_blocks_are_large() -> None:
    # With min_num_patches=16, a single-patch masked island is rare: most masked patches have a
    # masked 4-neighbour (random masking at the same ratio would have far fewer).
    masks = BlockMasking(14, 75)(200, generator=torch.Generator().manual_seed(1)).view(200, 14, 14)
    padded = torch.nn.functional.pad(masks.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    isolated = (masks & (neighbours == 0)).sum() / masks.sum()
    assert isolated < 0.01


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: RandomMasking(14, 1.0), "mask_ratio"),
        (lambda: RandomMasking(14, 0.0), "mask_ratio"),
        (lambda: GridMasking(14, 3, 0.5), "cell_size"),
        (lambda: BlockMasking(14, 197), "num_masking_patches"),
        (lambda: BlockMasking(14, 75, min_aspect=0), "aspect"),
    ],
)
def test_invalid_arguments(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_block_masking_fixed_rounds_equal_early_exit() -> None:
    """The sync-free path used off the CPU (a fixed number of rounds) gives the CPU path's masks."""
    masking = BlockMasking(14, 75, 16)
    early = masking._draw(512, torch.device("cpu"), torch.Generator().manual_seed(3), early_exit=True)
    fixed = masking._draw(512, torch.device("cpu"), torch.Generator().manual_seed(3), early_exit=False)
    assert torch.equal(early, fixed)
    assert torch.equal(early.flatten(1), masking(512, generator=torch.Generator().manual_seed(3)))


def test_block_masking_max_rounds_caps_the_blocks() -> None:
    full = BlockMasking(14, 75, 16)(256, generator=torch.Generator().manual_seed(0))
    capped = BlockMasking(14, 75, 16, max_rounds=1)(256, generator=torch.Generator().manual_seed(0))
    # one round = the first accepted block of the full run: a rectangle inside the full mask
    assert torch.equal(capped & full, capped)
    assert (capped.sum(1) < full.sum(1)).float().mean() > 0.5
    grid = capped.view(256, 14, 14)
    rows, cols = grid.any(2).sum(1), grid.any(1).sum(1)
    assert torch.equal(rows * cols, capped.sum(1))  # a single rectangle per mask
    with pytest.raises(ValueError, match="max_rounds"):
        BlockMasking(14, 75, max_rounds=0)
