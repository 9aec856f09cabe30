"""Projection heads."""

from __future__ import annotations

import itertools

from torch import Tensor, nn

__all__ = ["BNProjector", "DecodedImageHead"]


class BNProjector(nn.Sequential):
    """MLP with BatchNorm after every linear layer, as used by ConMIM, MoCo v3 and CMAE.

    ``Linear(no bias) -> BN -> ReLU`` for each hidden layer, then ``Linear(no bias) -> BN`` where the
    last BatchNorm is affine or not (``last_bn_affine``; ConMIM and MoCo v3 use a non-affine one).
    Accepts (..., in_dim) inputs: leading dimensions are flattened for BatchNorm, so applied to
    (B, N, D) tokens the statistics run over all B*N tokens.

    Args:
        in_dim: Input width.
        hidden_dim: Width of the hidden layers.
        out_dim: Output width.
        num_layers: Number of linear layers (>= 1).
        last_bn: Put a BatchNorm after the last linear layer.
        last_bn_affine: Give that last BatchNorm learnable scale and shift.
        hidden_bias: Give the hidden linear layers a bias (CMAE's projector and predictor do).
        bn_eps: BatchNorm epsilon.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        num_layers: int = 3,
        last_bn: bool = True,
        last_bn_affine: bool = False,
        hidden_bias: bool = False,
        bn_eps: float = 1e-5,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            hidden = i < num_layers - 1
            layers.append(nn.Linear(d_in, d_out, bias=hidden and hidden_bias))
            if hidden:
                layers += [nn.BatchNorm1d(d_out, eps=bn_eps), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(d_out, eps=bn_eps, affine=last_bn_affine))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


class DecodedImageHead(nn.Module):
    """CMAE's online head: feature decoder -> mean over positions -> projector -> predictor.

    Visible tokens (B, P + N_visible, D) and the mask (B, N) -> an image embedding (B, out).
    """

    def __init__(self, feature_decoder: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.feature_decoder = feature_decoder
        self.projector = projector
        self.predictor = predictor

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        features = self.feature_decoder(tokens, mask).mean(dim=1)  # (B, D)
        return self.predictor(self.projector(features))  # (B, proj_dim)
