"""Training-step cost of a method: our LightningModule under a Trainer against its floor, in one process.

    python benchmarks/step.py --method conmim --arch vit_small --batch 8
    python benchmarks/step.py --method cmae --arch vit_base --batch 64 --precision bf16-mixed --compile

"ours" is the steady-state time per optimizer step of the method's LightningModule as a Trainer runs
it (Lightning's loop, logging, mask generation, normalisation, EMA callback), on one in-memory uint8
batch repeated (no data loading). The "floor" is the same module's nn.Modules and loss maths driven by
a minimal hand-written loop on the same normalised inputs and the same masks: forward, loss, backward,
AdamW step, nothing else (no Lightning, logging, mask generation or EMA). ``ours/floor`` is the
overhead of everything that is not the model.

FLOPs per step are counted once on the floor step with ``torch.utils.flop_counter`` (forward and
backward); the forward FLOPs are split by the class of each network the step calls (MaskedViT: the
encoders; BNProjector, MAEDecoder, ...: heads and decoders). MFU = FLOPs / time / peak;
the peak is ``--peak-tflops``, by default 989 (H100/H200 dense bf16) on CUDA and, on a CPU, this
machine's own dense matmul rate in the chosen precision, measured first. Times are medians over
``--steps`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_mim import CIMModule, CMAEModule, ConMIMModule, MimCoModule
from lightning_mim.data import normalize
from lightning_mim.masking import RandomMasking

WIDTHS = {
    "vit_small": {"embed_dim": 384, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "num_heads": 16, "depth": 24},
}
GPU_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def build(method: str, arch: str, compile: bool) -> pl.LightningModule:
    """The method at its recipe settings for ``arch`` at 224 px."""
    if method == "conmim":
        return ConMIMModule(backbone_kwargs=WIDTHS[arch], compile=compile)
    if method == "cmae":
        return CMAEModule(backbone=f"{arch}_patch16_224", compile=compile)
    if method == "mae":
        masking = RandomMasking(14, 0.75)
        return CMAEModule(backbone=f"{arch}_patch16_224", contrastive_weight=0.0, masking=masking, compile=compile)
    if method == "mimco":
        return MimCoModule(backbone=f"{arch}_patch16_224", allow_random_teacher=True, compile=compile)
    if method == "cim":
        return CIMModule(enhancer=f"{arch}_patch16_224", allow_random_tokenizer=True, compile=compile)
    raise ValueError(f"unknown method {method!r}")


def floor_step(
    module: pl.LightningModule, method: str, batch: dict[str, torch.Tensor], mask: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The method's forward + loss on prepared inputs, without Lightning (the floor's maths)."""
    mean, std = module.mean, module.std  # type: ignore[attr-defined]
    x = normalize(batch["images"], mean, std)
    x2 = normalize(batch.get("teacher_images", batch.get("target_images", batch["images"])), mean, std)
    generator = torch.Generator(device=x.device).manual_seed(0)
    if method == "conmim":
        return lambda: module.compute_losses(x, x2, mask).total  # type: ignore[operator]
    if method in ("cmae", "mae"):
        target = x2 if method == "cmae" else None
        return lambda: module.compute_losses(x, target, mask).total  # type: ignore[operator]
    if method == "mimco":
        return lambda: module.compute_losses(x, mask).total  # type: ignore[operator]
    return lambda: module.compute_losses(batch["images"], mask, generator).total  # type: ignore[operator]


class _Repeat(Dataset):
    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


class _RepeatData(pl.LightningDataModule):
    """The same in-memory batch ``length`` times; ``batch_size`` for the methods' lr scaling."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        super().__init__()
        self.dataset = _Repeat(batch, length)
        self.batch_size = len(batch["images"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, num_workers=0)


class _StepTimer(pl.Callback):
    """Wall time per optimizer step (synchronised on CUDA), after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def time_ours(module: pl.LightningModule, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    """Median step time of ``module`` under a Trainer on a repeated in-memory batch."""
    timer = _StepTimer(args.warmup)
    data = _RepeatData(batch, args.warmup + args.steps + 1)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return statistics.median(timer.times)


def time_floor(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_peak_tflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """This machine's dense matmul rate (TFLOP/s) in ``dtype``, all threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def measure_floor(
    args: argparse.Namespace, device: torch.device, batch: dict[str, torch.Tensor]
) -> tuple[float, int, dict[str, dict[Any, int]]]:
    """Floor step time, FLOPs per step and FLOPs per submodule; the module is freed on return."""
    bf16 = args.precision == "bf16-mixed"
    module = build(args.method, args.arch, args.compile).to(device)
    module.configure_model()  # compiles the encoders with --compile, as the Trainer's hook does
    module.train()
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer in the bare loop
    device_batch = {k: v.to(device) for k, v in batch.items()}
    mask = module.masking(args.batch, device=device, generator=torch.Generator().manual_seed(0))  # type: ignore[operator]
    loss_fn = floor_step(module, args.method, device_batch, mask)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda" or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    counter = FlopCounterMode(display=False, depth=1)
    with counter:
        with autocast:
            loss = loss_fn()
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    # The split is taken on the forward pass only: FlopCounterMode attributes backward ops to whichever
    # network is current when autograd runs them, which mislabels gradients flowing between networks.
    forward = FlopCounterMode(display=False, depth=2)
    with forward, torch.no_grad(), autocast:
        loss_fn()
    return time_floor(step, args, device), counter.get_total_flops(), forward.get_flop_counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["conmim", "cmae", "mae", "mimco", "cim"], required=True)
    parser.add_argument("--arch", choices=sorted(WIDTHS), default="vit_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (the modules' compile=True)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: see above)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16-mixed"
    torch.manual_seed(0)

    images = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8)
    second_view = {"conmim": "teacher_images", "cmae": "target_images"}.get(args.method)
    batch = {"images": images, **({second_view: images.clone()} if second_view else {})}

    floor_s, flops, per_module = measure_floor(args, device, batch)

    # ---- ours: a fresh module under a Trainer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    module = build(args.method, args.arch, args.compile)
    ours_s = time_ours(module, batch, args)

    if args.peak_tflops is not None:
        peak, peak_note = args.peak_tflops, "given"
    elif device.type == "cuda":
        peak, peak_note = GPU_PEAK_TFLOPS, "H100/H200 dense bf16"
    else:
        peak = cpu_peak_tflops(torch.bfloat16 if bf16 else torch.float32)
        peak_note = f"this CPU's measured {'bf16' if bf16 else 'fp32'} matmul rate"
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
        name = torch.cuda.get_device_name()
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS)"
        name = f"CPU, {torch.get_num_threads()} threads"

    print(f"device: {name}; {args.precision}; batch {args.batch}; compile {args.compile}")
    print(f"{args.method} {args.arch}/16 224: ours {ours_s * 1e3:.1f} ms/step ({args.batch / ours_s:.2f} img/s)")
    print(f"floor (own modules, bare loop): {floor_s * 1e3:.1f} ms/step ({args.batch / floor_s:.2f} img/s)")
    print(f"ours/floor = {ours_s / floor_s:.3f}")
    print(f"FLOPs: {flops / args.batch / 1e9:.1f} GFLOP per image (forward + backward)")
    # forward FLOPs by the class of each network the step calls (e.g. MaskedViT = student + teacher encoders)
    flops_of = {k: sum(v.values()) for k, v in per_module.items() if k != "Global"}
    top = {k: v for k, v in flops_of.items() if "." not in k}
    total = sum(top.values()) or 1
    print("forward FLOPs by network (and its parts):")
    for name_, share in sorted(top.items(), key=lambda kv: -kv[1]):
        print(f"  {name_:<30} {share / args.batch / 1e9:8.1f} GFLOP/img  {100 * share / total:5.1f}%")
        depth = name_.count(".") + 1  # direct children only
        parts = {k: v for k, v in flops_of.items() if k.startswith(name_ + ".") and k.count(".") == depth and v > 0}
        for part, value in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"    {part:<28} {value / args.batch / 1e9:8.1f} GFLOP/img  {100 * value / total:5.1f}%")
    print(f"MFU: {100 * flops / ours_s / (peak * 1e12):.1f}% of {peak:.1f} TFLOP/s ({peak_note})")
    print(f"peak memory: {memory}")


if __name__ == "__main__":
    main()
