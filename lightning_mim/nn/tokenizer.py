"""Image tokenizers: images -> grids of discrete visual tokens -> images (CIM's frozen tokenizer).

:class:`ImageTokenizer` is the interface CIM needs. Two implementations:

* :class:`VQTokenizer`: a small VQ-VAE (convolutional encoder and decoder, EMA codebook with
  dead-code restart), trained as CIM's stage 0 with :class:`~lightning_mim.VQTokenizerModule`.
* :class:`DALLETokenizer`: the DALL-E dVAE used in the CIM paper, from weight files the user has
  locally (loading them unpickles Python objects, so it needs an explicit opt-in).

Images go in and come out as float (B, 3, H, W) in [0, 1]; token ids are long (B, h, w) with
``h = H / downsample``.
"""

from __future__ import annotations

import abc
import importlib.util
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DALLETokenizer", "EMAVectorQuantizer", "ImageTokenizer", "VQTokenizer"]


class ImageTokenizer(nn.Module, abc.ABC):
    """A discrete image tokenizer: ``encode`` images to ids, ``decode`` ids to images.

    Subclasses set ``vocab_size`` (number of distinct ids) and ``downsample`` (pixels per token
    side). Both methods take and return tensors on the tokenizer's device.
    """

    vocab_size: int
    downsample: int

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> token ids (B, H / downsample, W / downsample), long."""

    @abc.abstractmethod
    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, h, w) -> images (B, 3, h * downsample, w * downsample) in [0, 1]."""


# ----------------------------------------------------------------------------------- VQ-VAE
class EMAVectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with an exponential-moving-average codebook.

    In training mode every forward updates the codebook from the batch: per entry ``i``, with
    ``n_i`` the number of vectors assigned to it and ``s_i`` their sum,

        count_i <- decay * count_i + (1 - decay) * n_i
        sum_i   <- decay * sum_i   + (1 - decay) * s_i
        code_i  <- sum_i / count_i                     if count_i / (1 - decay^t) >= dead_threshold
                   a random vector of the current batch  otherwise (dead-code restart)

    ``count_i / (1 - decay^t)`` after ``t`` updates is the bias-corrected average number of vectors
    per batch assigned to entry ``i``. Counts start at zero, so the first training batch keeps the
    entries it uses (as the mean of their vectors) and restarts the others from its own vectors.
    Under ``torch.distributed`` the counts and sums are summed over ranks and rank 0's restart
    vectors are broadcast, so every rank holds the same codebook. In eval mode the codebook is fixed.
    Distances, statistics and the codebook are float32 whatever the autocast state.

    Args:
        num_codes: Codebook entries (the vocabulary size).
        dim: Code vector width.
        decay: EMA decay (VQ-VAE-2: 0.99).
        dead_threshold: Average vectors per (global) batch below which an entry is restarted
            (chosen default: 1).
    """

    codebook: Tensor
    counts: Tensor
    sums: Tensor
    updates: Tensor

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, dead_threshold: float = 1.0) -> None:
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise ValueError(f"need num_codes >= 2 and dim >= 1, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("counts", torch.zeros(num_codes))
        self.register_buffer("sums", torch.zeros(num_codes, dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def nearest(self, vectors: Tensor) -> Tensor:
        """Id of the nearest codebook entry (squared Euclidean) for each row of ``vectors`` (M, dim)."""
        vectors = vectors.float()
        distances = (
            vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ self.codebook.t() + self.codebook.pow(2).sum(1)
        )  # (M, V)
        return distances.argmin(dim=1)

    def lookup(self, ids: Tensor) -> Tensor:
        """Codebook vectors of ``ids`` (...) -> (..., dim)."""
        return F.embedding(ids, self.codebook)

    @torch.no_grad()
    def _update(self, vectors: Tensor, ids: Tensor) -> None:
        one_hot = F.one_hot(ids, self.num_codes).float()  # (M, V)
        batch_counts = one_hot.sum(0)  # (V,)
        batch_sums = one_hot.t() @ vectors  # (V, dim)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(batch_counts)
            dist.all_reduce(batch_sums)
        self.counts.mul_(self.decay).add_(batch_counts, alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(batch_sums, alpha=1 - self.decay)
        self.updates.add_(1)
        usage = self.counts / (1 - self.decay ** self.updates.double()).float()  # per batch, bias-corrected
        alive = usage >= self.dead_threshold  # (V,)
        means = self.sums / self.counts.clamp(min=1e-12).unsqueeze(1)
        pick = torch.randint(0, vectors.shape[0], (self.num_codes,), device=vectors.device)
        self.codebook.copy_(torch.where(alive.unsqueeze(1), means, vectors[pick]))
        if distributed:
            dist.broadcast(self.codebook, src=0)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantises encoder outputs ``z`` (B, dim, h, w).

        Returns:
            ``quantized`` (B, dim, h, w) with the straight-through gradient to ``z``, ``ids``
            (B, h, w), and the commitment term ``mean((z - sg(quantized))^2)`` (float32).
        """
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            batch, dim, h, w = z.shape
            vectors = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, dim)
            ids = self.nearest(vectors)
            if self.training:
                self._update(vectors.detach(), ids)
            quantized = self.lookup(ids).view(batch, h, w, dim).permute(0, 3, 1, 2)  # (B, dim, h, w)
            commitment = F.mse_loss(z, quantized.detach())
            quantized = z + (quantized - z).detach()
        return quantized, ids.view(batch, h, w), commitment


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VQTokenizer(ImageTokenizer):
    """A small VQ-VAE tokenizer (CIM's built-in stage-0 tokenizer).

    Encoder: 3x3 conv, ``log2(downsample)`` stride-2 4x4 convs, residual blocks, 1x1 conv to
    ``code_dim``; the decoder mirrors it with transposed convs. Pixels are mapped to [-1, 1] inside.

    Args:
        vocab_size: Codebook entries (spec: 512-1024; chosen default 1024).
        code_dim: Code vector width (spec: 32-64; chosen default 32).
        hidden_dim: Convolution width (chosen default 128).
        num_res_blocks: Residual blocks at the lowest resolution, in encoder and decoder (default 2).
        downsample: Pixels per token side, a power of 2 (spec: 8).
        ema_decay: Codebook EMA decay (default 0.99).
        dead_threshold: EMA count below which a codebook entry is restarted (default 1.0).
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        code_dim: int = 32,
        hidden_dim: int = 128,
        num_res_blocks: int = 2,
        downsample: int = 8,
        ema_decay: float = 0.99,
        dead_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of 2 >= 2, got {downsample}")
        stages = int(math.log2(downsample))
        self.vocab_size = vocab_size
        self.downsample = downsample
        self.code_dim = code_dim
        encoder: list[nn.Module] = [nn.Conv2d(3, hidden_dim, 3, padding=1)]
        for _ in range(stages):
            encoder += [nn.ReLU(), nn.Conv2d(hidden_dim, hidden_dim, 4, stride=2, padding=1)]
        encoder += [_ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        encoder += [nn.ReLU(), nn.Conv2d(hidden_dim, code_dim, 1)]
        self.encoder = nn.Sequential(*encoder)
        self.quantizer = EMAVectorQuantizer(vocab_size, code_dim, ema_decay, dead_threshold)
        decoder: list[nn.Module] = [nn.Conv2d(code_dim, hidden_dim, 3, padding=1)]
        decoder += [_ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        for _ in range(stages):
            decoder += [nn.ReLU(), nn.ConvTranspose2d(hidden_dim, hidden_dim, 4, stride=2, padding=1)]
        decoder += [nn.ReLU(), nn.Conv2d(hidden_dim, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def _check(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        if images.shape[-2] % self.downsample or images.shape[-1] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by {self.downsample}")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward: images in [0, 1] -> (reconstruction in [-1, 1] unclamped, ids, commitment)."""
        self._check(images)
        quantized, ids, commitment = self.quantizer(self.encoder(images * 2 - 1))
        return self.decoder(quantized), ids, commitment

    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        with torch.autocast(images.device.type, enabled=False):
            z = self.encoder(images.float() * 2 - 1)  # (B, code_dim, h, w)
        batch, dim, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, dim)).view(batch, h, w)

    def decode(self, ids: Tensor) -> Tensor:
        codes = self.quantizer.lookup(ids).permute(0, 3, 1, 2)  # (B, code_dim, h, w)
        return ((self.decoder(codes) + 1) / 2).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------- DALL-E
#: DALL-E's "logit-Laplace" pixel mapping keeps inputs inside (eps, 1 - eps) (openai/DALL-E).
_DALLE_EPS = 0.1
_PICKLE_WARNING = (
    "The DALL-E dVAE files (encoder.pkl, decoder.pkl) are pickled Python objects: loading one runs "
    "whatever code the file contains. Pass allow_pickle=True only for files from a source you trust "
    "(the official https://cdn.openai.com/dall-e/encoder.pkl and decoder.pkl)."
)


def _load_pickled_module(path: Path, allow_pickle: bool) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E weight file not found: {path}")
    if not allow_pickle:
        raise ValueError(f"refusing to unpickle {path}. {_PICKLE_WARNING}")
    if importlib.util.find_spec("dall_e") is None:
        raise ImportError(f"unpickling {path} needs OpenAI's `dall_e` package: pip install DALL-E")
    module = torch.load(path, map_location="cpu", weights_only=False)  # opted in above
    if not isinstance(module, nn.Module):
        raise TypeError(f"{path} holds a {type(module).__name__}, not a DALL-E encoder/decoder module")
    return module


class DALLETokenizer(ImageTokenizer):
    """The DALL-E dVAE (vocabulary 8192, downsampling 8), the tokenizer of the CIM paper.

    Needs OpenAI's ``dall_e`` package (``pip install DALL-E``) and its two weight files on local
    disk (downloaded once from https://cdn.openai.com/dall-e/encoder.pkl and ``decoder.pkl``). The
    files are pickled modules, so loading them executes code from the files: it is refused unless
    ``allow_pickle=True``. Inputs are mapped to ``(1 - 2 eps) x + eps`` with eps 0.1; ids are the
    argmax of the encoder logits; the decoder gets one-hot ids and its first three output channels,
    through a sigmoid and the inverse mapping, are the image.

    Args:
        encoder_path: Path of ``encoder.pkl``.
        decoder_path: Path of ``decoder.pkl``.
        allow_pickle: Allow unpickling the two files (see above).
    """

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path, allow_pickle: bool = False) -> None:
        super().__init__()
        self.encoder = _load_pickled_module(Path(encoder_path).expanduser(), allow_pickle)
        self.decoder = _load_pickled_module(Path(decoder_path).expanduser(), allow_pickle)
        self.vocab_size = int(getattr(self.encoder, "vocab_size", 8192))
        self.downsample = 8

    def encode(self, images: Tensor) -> Tensor:
        x = (1 - 2 * _DALLE_EPS) * images.float() + _DALLE_EPS
        return self.encoder(x).argmax(dim=1)  # (B, V, h, w) -> (B, h, w)

    def decode(self, ids: Tensor) -> Tensor:
        one_hot = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).float()  # (B, V, h, w)
        stats = self.decoder(one_hot).float()  # (B, 6, H, W)
        return ((torch.sigmoid(stats[:, :3]) - _DALLE_EPS) / (1 - 2 * _DALLE_EPS)).clamp(0.0, 1.0)
