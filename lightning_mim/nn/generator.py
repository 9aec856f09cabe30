"""CIM's generator: a small BEiT that predicts visual tokens at masked positions, and its sampling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_mim.nn.masked_vit import MaskedViT
from lightning_mim.nn.timm_models import TimmArgs

__all__ = ["TokenGenerator", "sample_tokens"]


def sample_tokens(
    logits: Tensor, ids: Tensor, mask: Tensor, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """Token map with masked positions replaced by samples from ``softmax(logits / temperature)``.

    Args:
        logits: Generator outputs (B, N, V); not differentiated.
        ids: Original token ids (B, N).
        mask: Bool (B, N), True where a sample replaces the original.
        temperature: Sampling temperature (> 0).
        generator: Random stream for the samples.

    Returns:
        Corrupted ids (B, N), long. A sample may equal the original id.
    """
    with torch.no_grad():
        # Inverse-CDF sampling: one uniform number per token instead of one per vocabulary entry.
        cdf = torch.softmax(logits.detach().float() / temperature, dim=-1).cumsum(dim=-1)  # (B, N, V)
        u = torch.rand(ids.shape, generator=generator, device=cdf.device).unsqueeze(-1) * cdf[..., -1:]
        samples = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        return torch.where(mask, samples, ids)


class TokenGenerator(nn.Module):
    """CIM's generator: a BEiT with mask tokens and a LayerNorm + Linear(D, V) head, token logits (B, N, V)."""

    def __init__(self, arch: str, vocab_size: int, names: TimmArgs | None = None, **timm_kwargs: Any) -> None:
        super().__init__()
        self.encoder = MaskedViT(arch, mode="mask_token", names=names, **timm_kwargs)
        width = self.encoder.embed_dim
        logits = nn.Linear(width, vocab_size)
        nn.init.trunc_normal_(logits.weight, std=0.02)  # BEiT's head init: near-uniform logits at start
        nn.init.zeros_(logits.bias)
        self.head = nn.Sequential(nn.LayerNorm(width), logits)

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.encoder.patch_tokens(self.encoder(images, mask)))
