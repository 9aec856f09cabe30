"""Run by tests/test_ddp.py in subprocesses: 2-process CPU (gloo) checks, and the same runs on 1 process."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def info_nce_case(out: str) -> None:
    """Loss and gradients of info_nce on 2 ranks x B against one process on 2B (in the methods' process group)."""
    from lightning_mim.losses import info_nce

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    query_all = torch.randn(2 * 4, 8, generator=g)
    key_all = torch.randn(2 * 4, 8, generator=g)
    results = {}
    for key_grad in (False, True):
        q = query_all[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        k = key_all[rank * 4 : (rank + 1) * 4].clone().requires_grad_(key_grad)
        loss = info_nce(q, k, 0.2)
        loss.backward()
        q_grad, k_grad = q.grad, k.grad
        assert q_grad is not None and (k_grad is not None) == key_grad
        # One process on 2B averages over 2B queries; each rank averages over its B: scale by 1/world.
        # (Key gradients already hold every rank's contribution, summed by the all-gather backward.)
        q_grad /= world
        if k_grad is not None:
            k_grad /= world
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        q_grads = [torch.zeros_like(q) for _ in range(world)]
        dist.all_gather(q_grads, q_grad)
        entry = {"loss": float(sum(losses) / world), "q_grad": torch.cat(q_grads).tolist()}
        if k_grad is not None:
            k_grads = [torch.zeros_like(k) for _ in range(world)]
            dist.all_gather(k_grads, k_grad)
            entry["k_grad"] = torch.cat(k_grads).tolist()
        results[str(key_grad)] = entry
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    if owned:
        dist.destroy_process_group()


def method_case(out: str, devices: int, method: str) -> None:
    """A few steps of a method under Lightning DDP; teacher checksums per rank and the kNN accuracy."""
    import lightning.pytorch as pl

    from lightning_mim.callbacks import OnlineKNN
    from lightning_mim.data import SampleDataModule
    from tests.helpers import tiny_method

    pl.seed_everything(0)
    module, teacher = tiny_method(method)
    dm = SampleDataModule(batch_size=8, num_workers=0, train_size=64, val_size=25)
    knn = OnlineKNN(k=5, batch_size=16)
    callbacks: list[pl.Callback] = [knn] if hasattr(module, "embed") else []  # the tokenizer has no features to probe
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, dm)
    tensors: list[torch.Tensor] = list(teacher.parameters())
    if method == "vq_tokenizer":  # the EMA codebook is a buffer (teachers' BatchNorm statistics are per rank)
        tensors += [b for b in teacher.buffers() if b.is_floating_point()]
    checksum = float(sum(t.double().sum() for t in tensors))
    result = {"teacher_checksum": checksum, "knn": knn.history}
    if method == "mimco" and devices > 1:
        result["image_loss_gap"] = mimco_image_loss_gap(module)
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump(result, f)


def mimco_image_loss_gap(module) -> float:
    """|mean over ranks of MimCo's image-level loss - the one-process loss on all ranks' images|."""
    from lightning_mim.data import normalize
    from lightning_mim.losses import info_nce

    rank, world = dist.get_rank(), dist.get_world_size()
    module.eval()  # BatchNorm on running statistics: per-image outputs, comparable across ranks
    for buffer in module.buffers():  # each rank's last step updated its own running statistics
        dist.broadcast(buffer, src=0)
    images = torch.randint(
        0, 256, (world * 4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        x = normalize(images)
        _, keys = module._teacher_targets(x)
        queries = module.image_head(module.student(x)[:, 0])
        local = slice(rank * 4, (rank + 1) * 4)
        distributed = info_nce(queries[local], keys[local], module.image_temperature)  # gathers keys
        dist.all_reduce(distributed)
        reference = info_nce(queries, keys, module.image_temperature, gather=False)
    return abs(float(distributed) / world - float(reference))


if __name__ == "__main__":
    # CASE[,CASE...] FOLDER: the cases run one after another in one launch (Lightning starts rank 1 at the
    # first fit; later fits and info_nce reuse the process group). A method writes FOLDER/METHOD.rankR,
    # info_nce (after a 2-rank method) FOLDER/info_nce.json.
    cases, out = sys.argv[1].split(","), sys.argv[2]
    for case in cases:
        if case == "info_nce":
            info_nce_case(os.path.join(out, "info_nce.json"))
        else:
            method_case(os.path.join(out, case), int(os.environ.get("DEVICES", "2")), case)
