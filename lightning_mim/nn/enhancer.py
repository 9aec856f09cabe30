"""CIM's enhancer: a timm ViT or ResNet with a replaced-token (RevDet) or pixel (ResPix) head."""

from __future__ import annotations

from typing import Any, Literal

import timm
from timm.models.beit import Beit
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_mim.losses import unpatchify

__all__ = ["Enhancer", "Objective", "timm_family"]

Objective = Literal["respix", "revdet"]


def timm_family(arch: str) -> str:
    """The timm module that defines ``arch`` (e.g. ``timm.models.resnet``); a clear error if unknown."""
    name = timm.models.split_model_name_tag(arch)[0]
    if not timm.is_model(name):
        raise ValueError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    return str(timm.models.model_entrypoint(name).__module__)


class Enhancer(nn.Module):
    """A timm backbone (``self.backbone``, exactly what timm loads) and one CIM head.

    Heads (CIM, arXiv:2202.03382):

    * ViT, RevDet: LayerNorm + Linear(D, 1) per patch token -> one logit per visual token.
    * ViT, ResPix: Linear(D, P*P*3) per patch token, unpatchified to the full image.
    * ResNet, RevDet: C5 (stride 32) -> x2 bilinear upsampling -> 1x1 conv -> a logit per 16x16 cell.
    * ResNet, ResPix: C5 -> 1x1 conv to 32*32*3 channels -> PixelShuffle(32) -> the full image.

    Args:
        arch: timm name of a ViT/BEiT (``vit_base_patch16_224``) or ResNet (``resnet50``).
        objective: ``"respix"`` or ``"revdet"``.
        image_size: Input side. ViTs take it as timm's ``img_size``; ResNets need a multiple of 32.
        **timm_kwargs: Passed to ``timm.create_model`` (``num_classes`` is 0, pooling off for ResNets).
    """

    def __init__(self, arch: str, objective: Objective, image_size: int | None = None, **timm_kwargs: Any) -> None:
        super().__init__()
        if objective not in ("respix", "revdet"):
            raise ValueError(f"objective must be 'respix' or 'revdet', got {objective!r}")
        family = timm_family(arch)
        self.is_vit = family in ("timm.models.vision_transformer", "timm.models.beit")
        if not self.is_vit and family != "timm.models.resnet":
            raise TypeError(f"{arch!r} is a {family} model; the CIM enhancer is a timm ViT, BEiT or ResNet")
        timm_kwargs.setdefault("num_classes", 0)
        if self.is_vit and image_size is not None:
            timm_kwargs.setdefault("img_size", image_size)
        if not self.is_vit:
            timm_kwargs.setdefault("global_pool", "")
        # typed Any: timm's submodules (patch_embed, num_features, ...) are reached by attribute
        self.backbone: Any = timm.create_model(arch, **timm_kwargs)
        self.timm_kwargs: dict[str, Any] = dict(timm_kwargs)  # what rebuilds self.backbone (for export)
        self.objective = objective
        self.arch = arch
        if isinstance(self.backbone, (VisionTransformer, Beit)):
            self.patch_size = int(self.backbone.patch_embed.patch_size[0])
            self.image_size = int(self.backbone.patch_embed.img_size[0])
            self.grid_size = (int(self.backbone.patch_embed.grid_size[0]), int(self.backbone.patch_embed.grid_size[1]))
            self.width = int(self.backbone.embed_dim)
            self.head: nn.Module = (
                nn.Sequential(nn.LayerNorm(self.width), nn.Linear(self.width, 1))
                if objective == "revdet"
                else nn.Linear(self.width, self.patch_size**2 * 3)
            )
        elif isinstance(self.backbone, ResNet):
            self.image_size = 224 if image_size is None else image_size
            if self.image_size % 32:
                raise ValueError(f"a ResNet enhancer needs an image_size divisible by 32, got {self.image_size}")
            self.patch_size = 16  # the RevDet cell: C5 (stride 32) upsampled x2
            self.grid_size = (self.image_size // 16, self.image_size // 16)
            self.width = int(self.backbone.num_features)
            self.head = (
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(self.width, 1, 1))
                if objective == "revdet"
                else nn.Sequential(nn.Conv2d(self.width, 32 * 32 * 3, 1), nn.PixelShuffle(32))
            )
        else:
            raise TypeError(f"{arch!r} builds a {type(self.backbone).__name__}, not a ViT, BEiT or ResNet")

    def features(self, images: Tensor) -> Tensor:
        """Patch tokens (B, N, D) of a ViT, or the C5 map (B, C, h, w) of a ResNet."""
        x = self.backbone.forward_features(images)
        return x[:, self.backbone.num_prefix_tokens :] if self.is_vit else x

    def pooled(self, images: Tensor) -> Tensor:
        """Global features (B, D): mean of the patch tokens or of the C5 map."""
        x = self.features(images)
        return x.mean(dim=1) if self.is_vit else x.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """RevDet: replaced-token logits (B, N). ResPix: predicted image (B, 3, H, W)."""
        x = self.features(images)
        if self.is_vit:
            out = self.head(x)  # (B, N, 1) or (B, N, P*P*3)
            if self.objective == "revdet":
                return out.squeeze(-1)
            return unpatchify(out, self.patch_size, self.grid_size)
        out = self.head(x)  # (B, 1, 2h, 2w) or (B, 3, H, W)
        return out.flatten(1) if self.objective == "revdet" else out
