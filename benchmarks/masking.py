"""Cost of mask generation relative to a ViT-S/16 training step.

    python benchmarks/masking.py [--batch 256] [--steps 3] [--threads N]

Times each mask generator for a batch of ``--batch`` masks on a 14x14 grid on the CPU (training draws
them on the module's device, so on a CPU run this is their cost in the step), and one training step (forward, backward,
AdamW) of a bare timm ViT-S/16 at 224 px on the same batch size, on this machine's CPU. Prints the
ratio; the target is < 5 %. A bare backbone step is the smallest step any method can have, so the
ratio is an upper bound for every method.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from lightning_mim.masking import BlockMasking, GridMasking, RandomMasking


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed ViT-S training steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    generators = {
        "BlockMasking(14, 75)": BlockMasking(14, 75),
        "RandomMasking(14, 0.75)": RandomMasking(14, 0.75),
        "GridMasking(14, 2, 0.75)": GridMasking(14, 2, 0.75),
    }
    mask_times = {name: time_it(lambda m=m: m(args.batch, generator=generator), 20) for name, m in generators.items()}

    model = timm.create_model("vit_small_patch16_224", num_classes=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, 224, 224)

    def step() -> None:
        loss = model.forward_features(images).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_time = time_it(step, args.steps)
    print(f"device: cpu, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"ViT-S/16 224 training step (bare backbone, fp32): {step_time * 1e3:9.1f} ms")
    for name, seconds in mask_times.items():
        print(f"{name:<26} {seconds * 1e3:9.2f} ms  = {100 * seconds / step_time:6.3f} % of the step")


if __name__ == "__main__":
    main()
