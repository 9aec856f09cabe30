"""CIM's enhancer: a timm ViT or ResNet with a replaced-token (RevDet) or pixel (ResPix) head."""

from __future__ import annotations

from typing import Any, Literal

from timm.models.beit import Beit
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_mim.nn.timm_models import (
    TOKEN_MODEL_FAMILIES,
    TimmArgs,
    create_timm_model,
    mean_pooling_kwargs,
    timm_family,
)
from lightning_mim.patches import unpatchify

__all__ = ["Enhancer", "Objective", "timm_family"]

Objective = Literal["respix", "revdet"]


class Enhancer(nn.Module):
    """A timm backbone (``self.backbone``, exactly what timm loads) and one CIM head.

    Heads (chosen defaults: CIM, arXiv:2202.03382, publishes no code, and these layer designs are ours,
    not confirmed from the paper's text):

    * ViT, RevDet: LayerNorm + Linear(D, 1) per patch token -> one logit per visual token.
    * ViT, ResPix: Linear(D, P*P*3) per patch token, unpatchified to the full image.
    * ResNet, RevDet: C5 (stride 32) -> x2 bilinear upsampling -> 1x1 conv -> a logit per 16x16 cell.
    * ResNet, ResPix: C5 -> 1x1 conv to 32*32*3 channels -> PixelShuffle(32) -> the full image.

    Args:
        arch: timm name of a ViT/BEiT (``vit_base_patch16_224``) or ResNet (``resnet50``).
        objective: ``"respix"`` or ``"revdet"``.
        image_size: Input side. ViTs take it as timm's ``img_size``; ResNets need a multiple of 32.
        names: The caller's names of ``arch`` and ``timm_kwargs``, for error messages.
        **timm_kwargs: Passed to ``timm.create_model`` (``num_classes`` is 0; ``global_pool`` decides
            :meth:`pooled`, default ``"avg"``; a ViT/BEiT keeps its final norm on every token).

    Raises:
        ValueError: Unknown architecture, arguments timm rejects, an image size that is not a multiple
            of the patch size (of 32 for a ResNet), or ``image_size`` and ``img_size`` that disagree.
        TypeError: ``arch`` is not a ViT, BEiT or ResNet.
    """

    def __init__(
        self,
        arch: str,
        objective: Objective,
        image_size: int | None = None,
        *,
        names: TimmArgs | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if objective not in ("respix", "revdet"):
            raise ValueError(f"objective must be 'respix' or 'revdet', got {objective!r}")
        names = names or TimmArgs("Enhancer", "arch", "timm_kwargs")
        family = timm_family(arch, names)
        self.is_vit = family in TOKEN_MODEL_FAMILIES
        if not self.is_vit and family != "timm.models.resnet":
            raise TypeError(
                f"{names.owner}({names.arch}={arch!r}): a {family} model; the CIM enhancer is a ViT, BEiT or ResNet"
            )
        timm_kwargs.setdefault("num_classes", 0)
        if self.is_vit and image_size is not None:
            img_size = timm_kwargs.setdefault("img_size", image_size)
            if img_size != image_size:
                raise ValueError(
                    f"{names.owner}(image_size={image_size}) disagrees with {names.kwargs} img_size={img_size}: "
                    "give one of them"
                )
        # pooled() is timm's own pooling: the mean of the final-normed patch tokens (ViT, BEiT) or of
        # the C5 map (ResNet), so an exported enhancer pools the same way in timm.
        timm_kwargs = mean_pooling_kwargs(family, timm_kwargs, names) if self.is_vit else timm_kwargs
        if not self.is_vit:
            timm_kwargs.setdefault("global_pool", "avg")
        # typed Any: timm's submodules (patch_embed, num_features, ...) are reached by attribute
        self.backbone: Any = create_timm_model(arch, names, **timm_kwargs)
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
                raise ValueError(
                    f"{names.owner}(image_size={self.image_size}): a ResNet enhancer needs an image size "
                    "divisible by 32 (its C5 stride)"
                )
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
        """Global features (B, D) by timm's pooling (default: mean of the patch tokens or of the C5 map)."""
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

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
