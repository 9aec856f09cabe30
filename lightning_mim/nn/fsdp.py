"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) of a student and its EMA teacher.

Used through Lightning's ``ModelParallelStrategy``, which builds a device mesh and calls the module's
``configure_model``; a method module that supports it calls :func:`shard_networks` there.

How the EMA teacher stays consistent with a sharded student. FSDP2 shards every parameter on its
first dimension across the ranks of the mesh, independently of the others. Student and teacher have
the same architecture and are sharded the same way, so rank r holds the same slice of a student
parameter and of its teacher counterpart: the EMA update ``teacher <- m * teacher + (1 - m) * student``
is elementwise, so it runs on the local shards (the same ``torch._foreach_lerp_`` as without
sharding, on DTensors) with no communication, and the teacher is exactly what unsharded training
gives (tested on 2 CPU processes against DDP: bit-identical). Memory per GPU for the teacher is
1/world of its size, like the student's; its forward all-gathers each block's parameters, as the
student's does. Every unit reshards after its forward: a network that is its own FSDP root would
otherwise keep its unsharded parameters after a forward that is never followed by a backward (the
teacher's), and the next forward would see them, not the EMA-updated shards.

The alternative, a replicated teacher updated from all-gathered student parameters, costs a full
copy of the teacher on every GPU plus an all-gather of the student after every step; sharding both
is cheaper in memory and communication.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["BLOCK_TYPES", "is_sharded", "shard_networks"]


def _block_types() -> tuple[type[nn.Module], ...]:
    from timm.models.beit import Block as BEiTBlock
    from timm.models.vision_transformer import Block as ViTBlock

    return ViTBlock, BEiTBlock


#: The modules that become their own FSDP unit (one all-gather each): timm ViT and BEiT blocks.
BLOCK_TYPES = _block_types()


def shard_networks(
    networks: Iterable[nn.Module],
    mesh: Any,
    forward_methods: Iterable[str] = (),
    block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES,
) -> None:
    """Applies ``fully_shard`` to each block of each network, then to the network itself.

    Args:
        networks: The modules to shard (a method's student, teacher, heads ...); every parameter of
            the LightningModule should be in one of them.
        mesh: A 1-D device mesh (shard over all its ranks) or a 2-D one (HSDP: replicate over the
            first dimension, shard over the second) — e.g. ``LightningModule.device_mesh``.
        forward_methods: Methods of the networks other than ``forward`` that run them (e.g. a
            features-only path for kNN); registered so that they gather the parameters as forward does.
        block_types: Module classes that become their own FSDP unit.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    methods = tuple(forward_methods)
    for network in networks:
        for module in network.modules():
            if isinstance(module, block_types):
                fully_shard(module, mesh=mesh, reshard_after_forward=True)
        fully_shard(network, mesh=mesh, reshard_after_forward=True)
        for name in methods:
            if callable(getattr(network, name, None)):
                register_fsdp_forward_method(network, name)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 unit."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
