"""A timm ViT or BEiT run on masked inputs."""

from __future__ import annotations

from typing import Any, Literal

import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_mim.nn.timm_models import (
    TOKEN_MODEL_FAMILIES,
    TimmArgs,
    create_timm_model,
    mean_pooling_kwargs,
    timm_family,
)

__all__ = ["MaskedViT", "visible_indices"]

MaskMode = Literal["mask_token", "visible"]


def visible_indices(mask: Tensor, num_visible: int | None = None) -> Tensor:
    """Grid indices of the visible (False) patches of each row of ``mask`` (B, N), in grid order.

    Every row must have ``num_visible`` visible patches; when None it is read from the first row
    (a device-to-host sync).
    """
    if num_visible is None:
        num_visible = int((~mask[0]).sum())
    # A stable sort puts the visible patches (False) first, in grid order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]


def _has_relative_position_bias(beit: Any) -> bool:
    shared = beit.rel_pos_bias is not None
    return shared or any(block.attn.relative_position_bias_table is not None for block in beit.blocks)


class MaskedViT(nn.Module):
    """Wraps a timm ``VisionTransformer`` or ``Beit`` so that it can encode masked images.

    Two modes:

    * ``"mask_token"`` (BEiT, SimMIM, ConMIM): the embeddings of masked patches are replaced by a
      learned ``mask_token`` before position embeddings are added; all N tokens are encoded.
    * ``"visible"`` (MAE, CMAE): only the unmasked patches (and the prefix tokens) are encoded. Every
      image of the batch must have the same number of visible patches. Not available for backbones
      with relative position bias, whose attention assumes the full grid.

    The timm model is kept whole as ``self.vit`` (its blocks, attention and norms run unchanged), so
    its state dict is exactly what timm loads.

    Args:
        arch: timm model name, e.g. ``"vit_base_patch16_224"`` or ``"beit_base_patch16_224"``.
        mode: ``"mask_token"`` or ``"visible"``.
        pretrained: Load timm's pretrained weights (needs them in the local cache).
        names: The caller's names of ``arch`` and ``timm_kwargs``, for error messages (a method
            module passes e.g. ``TimmArgs("ConMIMModule", "backbone", "backbone_kwargs")``).
        **timm_kwargs: Passed to ``timm.create_model`` (they override the architecture's defaults;
            ``num_classes`` defaults to 0). ``global_pool`` decides :meth:`pool`: ``"avg"`` (default,
            the mean of the patch tokens) or ``"token"`` (the CLS token); timm's final norm always
            stays on every token (``fc_norm`` / ``use_fc_norm`` is set to False, see
            :func:`~lightning_mim.nn.timm_models.mean_pooling_kwargs`), so a timm model built from
            ``timm_kwargs`` pools exactly as :meth:`pool` does.

    Raises:
        ValueError: Unknown architecture, arguments timm rejects, or an image size that is not a
            multiple of the patch size.
        TypeError: ``arch`` is not a ViT or BEiT.
    """

    def __init__(
        self,
        arch: str,
        mode: MaskMode = "mask_token",
        pretrained: bool = False,
        *,
        names: TimmArgs | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if mode not in ("mask_token", "visible"):
            raise ValueError(f"mode must be 'mask_token' or 'visible', got {mode!r}")
        names = names or TimmArgs("MaskedViT", "arch", "timm_kwargs")
        family = timm_family(arch, names)
        if family not in TOKEN_MODEL_FAMILIES:
            raise TypeError(f"{names.owner}({names.arch}={arch!r}): a {family} model; it needs a timm ViT or BEiT")
        timm_kwargs.setdefault("num_classes", 0)
        # timm's final norm stays on every token, as the pre-training code of BEiT, MAE and ConMIM
        # has it; pooled features (self.pool) are the mean of the normed patch tokens by default.
        timm_kwargs = mean_pooling_kwargs(family, timm_kwargs, names)
        # typed Any: timm's submodules (blocks, norms, tokens) are reached by attribute below
        self.vit: Any = create_timm_model(arch, names, pretrained=pretrained, **timm_kwargs)
        self.timm_kwargs: dict[str, Any] = dict(timm_kwargs)  # what rebuilds self.vit (for export)
        if not isinstance(self.vit, (VisionTransformer, Beit)):
            raise TypeError(f"{arch!r} builds a {type(self.vit).__name__}; MaskedViT needs a timm ViT or BEiT")
        self.is_beit = isinstance(self.vit, Beit)
        if mode == "visible" and self.is_beit and _has_relative_position_bias(self.vit):
            raise ValueError("mode='visible' is not supported with relative position bias (it needs the full grid)")
        self.mode = mode
        self.arch = arch
        self.embed_dim: int = self.vit.embed_dim
        self.num_prefix_tokens: int = self.vit.num_prefix_tokens
        self.grid_size: tuple[int, int] = (
            int(self.vit.patch_embed.grid_size[0]),
            int(self.vit.patch_embed.grid_size[1]),
        )
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        if mode == "mask_token":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay."""
        names = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        return names | ({"mask_token"} if self.mode == "mask_token" else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def _embed_with_mask_token(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return x
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match {self.num_patches} patches")
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return x * (1.0 - w) + self.mask_token.to(x.dtype) * w

    def _blocks(self, x: Tensor) -> Tensor:
        vit = self.vit
        if self.is_beit:
            rel_pos_bias = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
            for blk in vit.blocks:
                if vit.grad_checkpointing and self.training:
                    x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
                else:
                    x = blk(x, shared_rel_pos_bias=rel_pos_bias)
            return vit.norm(x)
        x = vit.norm_pre(x)
        for blk in vit.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if vit.grad_checkpointing and self.training else blk(x)
        return vit.norm(x)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Prefix tokens + position embeddings, (B, N, D) -> (B, P + N, D)."""
        vit = self.vit
        if not self.is_beit:
            return vit.patch_drop(vit._pos_embed(x))
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if vit.pos_embed is not None:
            x = x + vit.pos_embed
        return vit.pos_drop(x)

    def forward(self, images: Tensor, mask: Tensor | None = None, num_visible: int | None = None) -> Tensor:
        """Encodes ``images`` (B, C, H, W) with ``mask`` (B, N) bool, True = masked.

        Returns:
            Mask-token mode: all tokens, (B, P + N, D) with P prefix tokens (the CLS token).
            Visible mode: prefix + visible tokens in grid order, (B, P + N_visible, D). Pass
            ``num_visible`` (known from the mask generator) to avoid a device-to-host sync.
        """
        x = self.vit.patch_embed(images)  # (B, N, D)
        if self.mode == "mask_token":
            x = self._pos_embed(self._embed_with_mask_token(x, mask))  # (B, P + N, D)
            return self._blocks(x)
        x = self._pos_embed(x)
        if mask is not None:
            x = self._keep_visible(x, mask, num_visible)  # (B, P + N_visible, D)
        return self._blocks(x)

    def _keep_visible(self, x: Tensor, mask: Tensor, num_visible: int | None) -> Tensor:
        batch, _, dim = x.shape
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        keep = visible_indices(mask, num_visible)  # (B, N_visible)
        visible = torch.gather(patches, 1, keep.unsqueeze(-1).expand(batch, keep.shape[1], dim))
        return torch.cat((prefix, visible), dim=1)

    def pool(self, tokens: Tensor) -> Tensor:
        """Pooled features of an encoder output, as timm's model computes them: (B, P + N, D) -> (B, D).

        The mean of the patch tokens (``global_pool="avg"``) or the CLS token (``"token"``); the same
        numbers as ``timm.create_model(arch, num_classes=0, **timm_kwargs)(images)`` on unmasked images.
        """
        return self.vit.forward_head(tokens, pre_logits=True)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """Drops the prefix tokens of an encoder output: (B, P + N, D) -> (B, N, D)."""
        return tokens[:, self.num_prefix_tokens :]
