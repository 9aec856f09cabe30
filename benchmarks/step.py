"""Training-step cost of a method against the floor set by its backbone, in one process.

    python benchmarks/step.py --method cmae --arch vit_base --batch 8 --steps 3
    python benchmarks/step.py --method conmim --arch vit_base --batch 8 --steps 3
    python benchmarks/step.py --method cim --arch vit_base --batch 8 --steps 3

"ours" is one full training step of the method's LightningModule on an in-memory batch: mask
generation, normalisation, every forward, the loss, backward, AdamW and the EMA update (the work
Lightning's loop and the EMATeacher callback do, without the loop itself). The "floor" is the bare
timm backbone doing the unavoidable work of the method on the same inputs: forward + backward on the
tokens the student encodes (all tokens for ConMIM, 1 + visible for CMAE/MAE) plus a no-grad forward
on all tokens for the teacher/target (none for MAE), then AdamW. For CIM the floor is the enhancer
alone (forward + backward on all tokens): the ratio is the price of the generator and the tokenizer
(a random VQ tokenizer of the recipe's shape: 1024 codes, /8 at 112 px). Times are medians of ``--steps``
steps after one warm-up step, on this machine's CPU (or the GPU when available).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_mim import CIMModule, CMAEModule, ConMIMModule
from lightning_mim.masking import RandomMasking
from lightning_mim.nn import MaskedViT

ARCHS = {
    "vit_small": {"embed_dim": 384, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "num_heads": 12},
}


def build(method: str, arch: str) -> torch.nn.Module:
    size = ARCHS[arch]
    if method == "conmim":
        return ConMIMModule(backbone_kwargs=size)
    if method == "cmae":
        return CMAEModule(backbone=f"{arch}_patch16_224")
    if method == "mae":
        return CMAEModule(backbone=f"{arch}_patch16_224", contrastive_weight=0.0, masking=RandomMasking(14, 0.75))
    if method == "cim":
        return CIMModule(enhancer=f"{arch}_patch16_224", allow_random_tokenizer=True)
    raise ValueError(f"unknown method {method!r}")


def median_time(step: Callable[[], None], steps: int, device: torch.device) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["conmim", "cmae", "mae", "cim"], required=True)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit_base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    module = build(args.method, args.arch).to(device)
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if args.method == "cim":
        pairs = []  # no teacher
    elif hasattr(module, "momentum_pairs"):
        pairs = list(module.momentum_pairs())
    else:
        pairs = [(module.student, module.teacher)]
    teacher_params = [p for _, t in pairs for p in t.parameters()]
    student_named = [dict(s.named_parameters()) for s, _ in pairs]
    student_params = [
        named[n] for named, (_, t) in zip(student_named, pairs, strict=True) for n, _ in t.named_parameters()
    ]
    images = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, device=device)
    batch = {"images": images, "teacher_images": images, "target_images": images}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def ours() -> None:
        with autocast:
            loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if teacher_params:
            with torch.no_grad():
                torch._foreach_lerp_(teacher_params, student_params, 0.004)

    # The floor: the bare backbone on the same token counts.
    visible_only = args.method in ("cmae", "mae")
    backbone = MaskedViT(
        "beit_base_patch16_224" if args.method == "conmim" else f"{args.arch}_patch16_224",
        mode="visible" if visible_only else "mask_token",
        **(ARCHS[args.arch] if args.method == "conmim" else {}),
    ).to(device)
    floor_optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4)
    x = images.float()
    masker = module.masking
    mask = masker(args.batch, device=device, generator=torch.Generator().manual_seed(0))
    num_visible = 196 - masker.num_masking_patches if visible_only else None

    def floor() -> None:
        with autocast:
            if args.method not in ("mae", "cim"):
                with torch.no_grad():
                    backbone(x)  # teacher / target: all tokens, no grad
            if visible_only:
                out = backbone(x, mask, num_visible=num_visible)
            else:
                out = backbone(x) if args.method == "cim" else backbone(x, mask)
            loss = out.float().pow(2).mean()
        floor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        floor_optimizer.step()

    ours_s = median_time(ours, args.steps, device)
    floor_s = median_time(floor, args.steps, device)
    print(f"device: {device}, {torch.get_num_threads()} threads, {'bf16' if args.bf16 else 'fp32'}, batch {args.batch}")
    print(f"{args.method} {args.arch}/16 224: ours {ours_s:.3f} s/step ({args.batch / ours_s:.2f} img/s)")
    print(f"floor (bare backbone, same tokens): {floor_s:.3f} s/step")
    print(f"ours/floor = {ours_s / floor_s:.2f}")


if __name__ == "__main__":
    main()
