"""Loss functions: tensors in, scalar tensor out.

Similarities and softmaxes are computed in float32 whatever the input dtype, with autocast disabled
around them (autocast would otherwise run the similarity matmuls in bf16 even on float32 inputs), so
bf16-mixed runs do not lose precision in the contrastive logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce", "masked_patch_mse", "patch_contrastive_loss", "window_normalize"]


def patch_contrastive_loss(student: Tensor, teacher: Tensor, mask: Tensor, temperature: float = 0.1) -> Tensor:
    """Denoising patch contrast with an intra-image dictionary (ConMIM, MimCo).

    For every masked patch ``i`` of image ``b`` the student feature is the query, the teacher
    feature of the same patch the positive key, and the teacher features of the other patches of the
    *same* image the negatives::

        loss_bi = -log( exp(q_bi . k_bi / t) / sum_j exp(q_bi . k_bj / t) )

    with ``q`` and ``k`` L2-normalised. The loss is the mean over all masked patches of the batch.
    The teacher is not differentiated.

    Args:
        student: Student patch features, (B, N, D).
        teacher: Teacher patch features for the same patches, (B, N, D).
        mask: Bool (B, N), True where the patch was masked for the student.
        temperature: Softmax temperature t.

    Returns:
        The scalar loss (float32).
    """
    if student.shape != teacher.shape or student.shape[:2] != mask.shape:
        raise ValueError(
            f"expected student, teacher (B, N, D) and mask (B, N); got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)} and {tuple(mask.shape)}"
        )
    batch, num_patches = mask.shape
    with torch.autocast(student.device.type, enabled=False):  # float32 similarities under bf16 autocast
        q = F.normalize(student.float(), dim=-1)  # (B, N, D)
        k = F.normalize(teacher.detach().float(), dim=-1)  # (B, N, D)
        logits = torch.bmm(q, k.transpose(1, 2)) / temperature  # (B, N, N): row i = query i vs all keys
        target = torch.arange(num_patches, device=logits.device).expand(batch, num_patches)
        per_patch = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")  # (B*N,)
    weights = mask.flatten().float()
    # Averaging with weights (not boolean indexing) keeps shapes static: no host sync.
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


def _gather_keys(key: Tensor) -> tuple[Tensor, int]:
    """Keys from all ranks, concatenated in rank order, and this rank's offset into them."""
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    if key.requires_grad:
        # Differentiable gather: the backward pass sums the key gradients of all ranks.
        gathered = list(dist_fn.all_gather(key))
    else:
        gathered = [torch.empty_like(key) for _ in range(world_size)]
        dist.all_gather(gathered, key.contiguous())
    return torch.cat(gathered), rank * key.shape[0]


def info_nce(query: Tensor, key: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """InfoNCE between matching rows of ``query`` and ``key``, negatives from the whole batch.

    ``loss = mean_i CE( q_i . K^T / t, i )`` with L2-normalised rows. With ``gather=True`` and an
    initialised process group the keys of all ranks form the dictionary and the labels are offset by
    this rank's position; gradients stay exact (keys that require grad are gathered with a
    differentiable all-gather). Methods apply their own scaling (MoCo v3 and CMAE multiply by 2t).

    Args:
        query: (B, D) queries.
        key: (B, D) keys, ``key[i]`` is the positive of ``query[i]``.
        temperature: Softmax temperature t.
        gather: Use the keys of every rank as negatives when running distributed.

    Returns:
        The scalar loss (float32), the mean over this rank's queries.
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(f"expected query and key of equal shape (B, D); got {tuple(query.shape)}, {tuple(key.shape)}")
    with torch.autocast(query.device.type, enabled=False):  # float32 similarities under bf16 autocast
        q = F.normalize(query.float(), dim=-1)
        k = F.normalize(key.float(), dim=-1)
        offset = 0
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            k, offset = _gather_keys(k)
        labels = torch.arange(q.shape[0], device=q.device) + offset
        logits = q @ k.T / temperature  # (B, world * B)
        return F.cross_entropy(logits, labels)


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """Mean squared error over masked patches (MAE, CMAE).

    With ``norm_pix`` each target patch is normalised by its own mean and *unbiased* variance:
    ``(t - mean) / sqrt(var + eps)``. The loss is ``sum_i m_i * mean_d (p_i - t_i)^2 / sum_i m_i``.

    Args:
        pred: Predicted patches, (B, N, D).
        target: Target patches (e.g. :func:`patchify` of the image), (B, N, D).
        mask: Bool (B, N), True where the patch was masked (only those count).
        norm_pix: Normalise each target patch.
        eps: Added to the variance.

    Returns:
        The scalar loss (float32).
    """
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(
            f"expected pred, target (B, N, D) and mask (B, N); got {tuple(pred.shape)}, "
            f"{tuple(target.shape)} and {tuple(mask.shape)}"
        )
    target = target.float()
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    weights = mask.float()
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


def window_normalize(images: Tensor, window: int = 8, eps: float = 1e-6) -> Tensor:
    """Sliding-window normalised images, the ResPix target of CIM.

    Every pixel of every channel becomes ``(x - mean) / sqrt(var + eps)``, where ``mean`` and the
    *population* variance ``var`` are taken over the ``window`` x ``window`` window at that pixel
    (stride 1). The image is reflect-padded by ``(window - 1) // 2`` pixels before and ``window // 2``
    after on each axis (3 and 4 for a window of 8), so the output has the input's size and, for
    even windows, the pixel sits just above and left of its window's centre.

    Args:
        images: (B, C, H, W); computed in float32.
        window: Window side ``k`` (8: our chosen default for CIM).
        eps: Added to the variance.

    Returns:
        (B, C, H, W) float32.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    before, after = (window - 1) // 2, window // 2
    if min(images.shape[-2:]) <= after:
        raise ValueError(f"images of {tuple(images.shape[-2:])} px are too small for reflect padding of {after}")
    x = images.float()
    # Window statistics are shift-invariant; centring each channel first keeps E[x^2] - E[x]^2 well
    # conditioned in float32 (a flat image gives exactly 0).
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    padded = F.pad(x, (before, after, before, after), mode="reflect")
    mean = F.avg_pool2d(padded, window, stride=1)  # (B, C, H, W)
    mean_sq = F.avg_pool2d(padded * padded, window, stride=1)
    var = (mean_sq - mean * mean).clamp(min=0.0)
    return (x - mean) / (var + eps).sqrt()
