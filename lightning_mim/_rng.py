"""Seeding of the random streams that lightning-mim owns (masks, evaluation subsets)."""

from __future__ import annotations

import enum
import random
from typing import Any

import numpy as np
import torch

_MOD = 2**63 - 1
_GLOBAL_STREAM = 0x474C  # offset of the stream that seeds torch's global generators ("GL")


class Stream(enum.IntEnum):
    """The id of every random stream lightning-mim draws from: one registry, so no two collide.

    A run's draws are functions of (run seed, stream id, rank, draw number), so changing an id
    changes what every run with that seed draws (and resumed runs would no longer match): ids are
    fixed once given. A :class:`CountedStream` also seeds the global generators from
    ``id + 0x474C``; the ids stay clear of those values too (tested).
    """

    CONMIM_MASKS = 1  #: ConMIM training masks (validation: fixed per batch index, same id)
    CMAE_MASKS = 2  #: CMAE / MAE masks
    MIMCO_MASKS = 3  #: MimCo masks
    CIM_MASKS = 4  #: CIM masks over the token grid
    CIM_SAMPLES = 5  #: CIM generator sampling
    DIAGNOSTICS = 9  #: VisualDiagnostics' masks and samples (training streams never advance)
    MASKING_CALLBACK = 11  #: MaskingCallback, training batches
    MASKING_CALLBACK_VALIDATION = 12  #: MaskingCallback, validation batches (fixed per batch index)
    KNN_BANK = 23  #: OnlineKNN's subset of the bank images
    KNN_QUERIES = 24  #: OnlineKNN's subset of the query images
    STEPS = 0x5354  #: "ST": the global generators at each training step (MoCo v3, tokenizer, evaluation)
    VIEWS = 0x5649  #: "VI": per-image view augmentations in the data loaders


_MASK64 = 2**64 - 1


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2^63 - 1) that depends on every part, with nearby inputs far apart in every bit.

    SplitMix64's finaliser over the parts in turn. Seeds made by adding a counter (``seed + step``)
    differ only in their low bits, and torch's CPU generator keeps only the low 32 bits of a seed, so
    every derived seed goes through this.
    """
    x = 0
    for part in parts:
        x = (x ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x % _MOD


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the generators a process uses.

    The CPU one, and each accelerator backend (CUDA, XPU, MPS) only once it is initialised.

    ``torch.manual_seed`` also queues a seed for every backend not yet initialised, formatting a stack
    trace for each: about 0.65 ms per call on a machine with a CUDA build and no GPU in use, several
    times the cost of an image's augmentation in a data-loader worker. A backend initialised later is
    not seeded by this call (data-loader workers never initialise one; a training step runs on an
    initialised device).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    if hasattr(torch, "xpu") and torch.xpu.is_initialized():
        torch.xpu.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)


def stream_seed(stream: int, rank: int = 0, base: int | None = None) -> int:
    """A seed for random stream ``stream`` on ``rank``, derived from the run seed.

    ``base`` defaults to ``torch.initial_seed()``, which ``lightning.seed_everything`` (and the
    CLI's ``seed_everything``) set to the run seed, so runs with the same seed draw the same
    streams, and ranks draw different ones.
    """
    base = torch.initial_seed() if base is None else base
    return mix_seed(base, stream, rank)


def make_generator(
    stream: int, rank: int = 0, base: int | None = None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (the CPU by default) seeded with :func:`stream_seed`."""
    return torch.Generator(device=device).manual_seed(stream_seed(stream, rank, base))


class CountedStream:
    """A random stream that is reseeded from (run seed, stream, rank, draw number) at every draw.

    Its whole state is two integers, identical on every rank, so a checkpoint written by rank 0
    restores every rank exactly, and each rank still draws its own masks.

    Args:
        stream: Stream identifier (separates e.g. training masks from other randomness).
    """

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self.base: int | None = None
        self.count = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def next(self, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator (on ``device``, the CPU by default) for the next draw on ``rank``."""
        if self.base is None:
            self.base = torch.initial_seed()
        device = torch.device(device)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(mix_seed(stream_seed(self.stream, rank, self.base), self.count))
        self.count += 1
        return generator

    def seed_global(self, rank: int, advance: bool = False) -> None:
        """Seeds the global generators (torch CPU and CUDA, NumPy, ``random``) for the coming draw on ``rank``.

        Call it at the start of a training step, before :meth:`next`. Randomness that comes from the
        global streams (dropout, timm's drop path, mixup, random erasing) is then a function of (run
        seed, rank, step) alone, so a run resumed from a checkpoint draws exactly what the
        uninterrupted run drew, whatever else consumed the global streams in between (data-loader
        start-up, validation). Host-side only: no device synchronisation.

        Args:
            rank: This process's global rank.
            advance: Count this as a draw (for a stream used only to seed the global generators).
        """
        if self.base is None:
            self.base = torch.initial_seed()
        seed = mix_seed(stream_seed(self.stream + _GLOBAL_STREAM, rank, self.base), self.count)
        seed_torch(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if advance:
            self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = None if state["base"] is None else int(state["base"])
        self.count = int(state["count"])
