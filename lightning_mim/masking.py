"""Mask generators for masked image modeling.

Convention used everywhere in lightning-mim: a mask is a bool tensor of shape (B, N) over the patch
grid in row-major order, and ``True`` means *masked*, i.e. hidden from the student.

Every generator is called as ``masking(batch_size, device=None, generator=None)``. The masks are
computed on the generator's device (the CPU when no generator is given) from that generator's random
stream alone, so a seeded ``torch.Generator`` reproduces them exactly, and then moved to ``device``.
The method modules pass a generator on their own device, so on a GPU the masks are made there, by a
fixed sequence of kernels that never waits for the GPU (no host synchronisation). The computation is
vectorised over the batch: a batch of 256 BEiT block masks at 14x14 costs a few milliseconds on a
CPU (``benchmarks/masking.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["BlockMasking", "GridMasking", "MaskGenerator", "RandomMasking", "num_masked_for_ratio"]


class MaskGenerator(ABC):
    """Base class of mask generators: subclass it (and name it by ``class_path`` in configs) to add one.

    A generator has a patch grid (``height`` x ``width``) and returns bool (B, height * width) masks.
    """

    height: int
    width: int
    #: Whether every mask has exactly ``num_masking_patches`` masked patches (needed by encoders that
    #: drop masked tokens, e.g. MAE and CMAE).
    fixed_count: bool = True
    num_masking_patches: int

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    @abstractmethod
    def __call__(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Masks for ``batch_size`` images, computed on the generator's device, returned on ``device``."""


def _to_device(mask: Tensor, device: torch.device | str | None) -> Tensor:
    """Moves a mask to ``device``; host-to-GPU copies go through pinned memory without blocking the host."""
    if device is None or mask.device == torch.device(device):
        return mask
    if mask.device.type == "cpu" and torch.device(device).type == "cuda":
        return mask.pin_memory().to(device, non_blocking=True)
    return mask.to(device)


def _grid(input_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    if height < 1 or width < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    return height, width


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")


def _check_some_visible(num_masked: int, total: int, what: str, mask_ratio: float) -> None:
    if num_masked >= total:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks all {total} {what} (N - int(N * (1 - mask_ratio))); at least one "
            "must stay visible: lower mask_ratio or use a finer grid"
        )


def num_masked_for_ratio(num_tokens: int, mask_ratio: float) -> int:
    """Number of masked tokens for a ratio: ``N - int(N * (1 - ratio))`` (the MAE rule)."""
    return num_tokens - int(num_tokens * (1.0 - mask_ratio))


def _random_subset_mask(batch_size: int, num_tokens: int, num_masked: int, generator: torch.Generator | None) -> Tensor:
    """(B, N) bool with exactly ``num_masked`` True per row, uniformly at random."""
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    masked_ids = noise.argsort(dim=1)[:, :num_masked]  # (B, num_masked)
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=device)
    return mask.scatter_(1, masked_ids, True)


class RandomMasking(MaskGenerator):
    """Uniform random masking of exactly ``N - int(N * (1 - mask_ratio))`` patches (MAE).

    Args:
        input_size: Patch grid size, an int for a square grid or (height, width).
        mask_ratio: Fraction of patches to mask, in (0, 1); at least one patch must stay visible.
    """

    def __init__(self, input_size: int | tuple[int, int] = 14, mask_ratio: float = 0.75) -> None:
        _check_ratio(mask_ratio)
        self.height, self.width = _grid(input_size)
        self.mask_ratio = mask_ratio
        self.num_masking_patches = num_masked_for_ratio(self.num_patches, mask_ratio)
        _check_some_visible(self.num_masking_patches, self.num_patches, "patches", mask_ratio)

    def __call__(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        mask = _random_subset_mask(batch_size, self.num_patches, self.num_masking_patches, generator)
        return _to_device(mask, device)

    def __repr__(self) -> str:
        return f"RandomMasking(input_size=({self.height}, {self.width}), mask_ratio={self.mask_ratio})"


class GridMasking(MaskGenerator):
    """Random masking of ``cell_size`` x ``cell_size``-patch cells.

    SimMIM's "mask patch size 32" on 16-px patches is ``cell_size=2``; CMAE uses the same scheme. The
    number of masked cells follows the MAE rule over the cell grid: at 224 px, ``cell_size=2`` and
    ``mask_ratio=0.75`` mask 37 of 49 cells (148 of 196 patches); ``mask_ratio=0.65`` masks 32 cells
    (128 patches, 68 visible).

    Args:
        input_size: Patch grid size, an int for a square grid or (height, width).
        cell_size: Side of a masking cell in patches; must divide the grid.
        mask_ratio: Fraction of cells to mask, in (0, 1); at least one cell must stay visible.
    """

    def __init__(self, input_size: int | tuple[int, int] = 14, cell_size: int = 2, mask_ratio: float = 0.75) -> None:
        _check_ratio(mask_ratio)
        self.height, self.width = _grid(input_size)
        if cell_size < 1 or self.height % cell_size or self.width % cell_size:
            raise ValueError(f"cell_size={cell_size} must divide the patch grid ({self.height}, {self.width})")
        self.cell_size = cell_size
        self.mask_ratio = mask_ratio
        self.num_cells = (self.height // cell_size) * (self.width // cell_size)
        self.num_masked_cells = num_masked_for_ratio(self.num_cells, mask_ratio)
        _check_some_visible(self.num_masked_cells, self.num_cells, f"{cell_size}x{cell_size} cells", mask_ratio)
        self.num_masking_patches = self.num_masked_cells * cell_size * cell_size

    def __call__(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        k = self.cell_size
        cells = _random_subset_mask(batch_size, self.num_cells, self.num_masked_cells, generator)
        cells = cells.view(batch_size, self.height // k, self.width // k)
        mask = cells.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)  # (B, H, W)
        mask = mask.reshape(batch_size, self.num_patches)
        return _to_device(mask, device)

    def __repr__(self) -> str:
        return (
            f"GridMasking(input_size=({self.height}, {self.width}), cell_size={self.cell_size}, "
            f"mask_ratio={self.mask_ratio})"
        )


class BlockMasking(MaskGenerator):
    """BEiT's block-wise masking.

    Rectangular blocks are added until ``num_masking_patches`` patches are masked. Each block draws
    a target area uniformly from [``min_num_patches``, remaining budget] and an aspect ratio
    log-uniformly from [``min_aspect``, ``max_aspect``]; a block is accepted only if it adds between
    1 and ``min(remaining budget, max_num_patches)`` new patches. After ``attempts`` failed draws in
    a row the mask is final, so a mask can end with fewer patches than asked for. Defaults are
    BEiT's and ConMIM's (75 of 196 patches).

    All samples of a batch are drawn together: because a failed draw leaves the mask unchanged, the
    ``attempts`` draws of one round can be tried at once and the first acceptable one applied, which
    gives exactly the distribution of the sequential algorithm. A round adds one block to every mask
    still growing. On the CPU the rounds stop as soon as every mask is final; on other devices that
    test would make the host wait for the device, so exactly ``max_rounds`` rounds run (finished masks
    are left unchanged by the extra rounds). Either way a mask still growing after ``max_rounds``
    rounds is final there. At the defaults, 20,000 masks needed at most 11 rounds (median 4); with
    98 of 196 patches at most 14.

    Args:
        input_size: Patch grid size, an int for a square grid or (height, width).
        num_masking_patches: Upper bound on masked patches per image.
        min_num_patches: Smallest target area of a block.
        max_num_patches: Largest number of patches a single block may add (default: no limit).
        min_aspect: Smallest block aspect ratio (height / width).
        max_aspect: Largest aspect ratio (default ``1 / min_aspect``).
        attempts: Draws per block before giving up.
        max_rounds: Most blocks per mask (chosen default 24, well above what masks need; see above).
    """

    fixed_count = False  # num_masking_patches is an upper bound

    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        attempts: int = 10,
        max_rounds: int = 24,
    ) -> None:
        self.height, self.width = _grid(input_size)
        if not 0 < num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} must be in [1, {self.num_patches}] "
                f"for a {self.height}x{self.width} patch grid"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise ValueError(f"invalid aspect range [{min_aspect}, {max_aspect}]")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        if attempts < 1 or max_rounds < 1:
            raise ValueError(f"attempts and max_rounds must be >= 1, got {attempts} and {max_rounds}")
        self.attempts = attempts
        self.max_rounds = max_rounds

    @classmethod
    def beit_default(cls, input_size: int | tuple[int, int] = 14) -> BlockMasking:
        """BEiT's 75 of 196 patches with blocks of at least 16, both scaled to another patch grid."""
        height, width = _grid(input_size)
        num_patches = height * width
        return cls((height, width), round(75 / 196 * num_patches), max(1, round(16 / 196 * num_patches)))

    def __call__(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        mask = self._draw(batch_size, gen_device, generator, early_exit=gen_device.type == "cpu")
        return _to_device(mask.view(batch_size, self.num_patches), device)

    def _draw(
        self, batch_size: int, gen_device: torch.device, generator: torch.Generator | None, early_exit: bool
    ) -> Tensor:
        """(B, H, W) masks; ``early_exit`` stops once every mask is final (a host sync off the CPU)."""
        height, width, attempts = self.height, self.width, self.attempts
        mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=gen_device)
        count = torch.zeros(batch_size, dtype=torch.long, device=gen_device)
        active = torch.ones(batch_size, dtype=torch.bool, device=gen_device)
        rows = torch.arange(height, device=gen_device).view(1, 1, height, 1)
        cols = torch.arange(width, device=gen_device).view(1, 1, 1, width)
        batch_ids = torch.arange(batch_size, device=gen_device)
        low_log, high_log = self.log_aspect_ratio

        def uniform(low: Tensor | float, high: Tensor | float) -> Tensor:
            u = torch.rand(batch_size, attempts, generator=generator, device=gen_device)
            return low + u * (high - low)  # (B, attempts)

        for _ in range(self.max_rounds):
            budget = (self.num_masking_patches - count).clamp(max=self.max_num_patches)  # (B,)
            active &= budget > 0
            if early_exit and not bool(active.any()):
                break
            target_area = uniform(float(self.min_num_patches), budget[:, None].float())
            aspect = torch.exp(uniform(low_log, high_log))
            h = torch.round(torch.sqrt(target_area * aspect)).long()  # (B, attempts)
            w = torch.round(torch.sqrt(target_area / aspect)).long()
            fits = (h < height) & (w < width)
            # randint(0, H - h) inclusive, as in BEiT
            top = (uniform(0.0, 1.0) * (height - h + 1).clamp(min=1)).floor().long()
            left = (uniform(0.0, 1.0) * (width - w + 1).clamp(min=1)).floor().long()
            top, left = top[..., None, None], left[..., None, None]
            block = (
                (rows >= top) & (rows < top + h[..., None, None]) & (cols >= left) & (cols < left + w[..., None, None])
            )  # (B, attempts, H, W)
            new = (block & ~mask[:, None]).sum(dim=(2, 3))  # (B, attempts)
            ok = fits & (new > 0) & (new <= budget[:, None]) & active[:, None]
            accepted = ok.any(dim=1)  # (B,)
            first = ok.int().argmax(dim=1)  # index of the first acceptable draw
            chosen = block[batch_ids, first] & accepted[:, None, None]  # (B, H, W)
            count += (chosen & ~mask).sum(dim=(1, 2))
            mask |= chosen
            active &= accepted
        return mask

    def __repr__(self) -> str:
        return (
            f"BlockMasking(input_size=({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches})"
        )
