"""Seeding of the random streams that lightning-mim owns (masks, evaluation subsets)."""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) to spread nearby seeds apart


def stream_seed(stream: int, rank: int = 0, base: int | None = None) -> int:
    """A seed for random stream ``stream`` on ``rank``, derived from the run seed.

    ``base`` defaults to ``torch.initial_seed()``, which ``lightning.seed_everything`` (and the
    CLI's ``seed_everything``) set to the run seed, so runs with the same seed draw the same
    streams, and ranks draw different ones.
    """
    base = torch.initial_seed() if base is None else base
    return (base * _MIX + stream * 1_000_003 + rank * 7_919) % (2**63 - 1)


def make_generator(stream: int, rank: int = 0, base: int | None = None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(stream, rank, base))
