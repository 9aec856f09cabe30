"""Refactoring guard: the weights of a fixed-seed 3-step run of every method, saved or compared.

A change that must not alter behaviour (moving code, sharing plumbing) is checked by running this
before and after it::

    python benchmarks/fingerprint.py --save /tmp/before     # on the old code
    python benchmarks/fingerprint.py --compare /tmp/before  # on the new code: every tensor equal

Each method is a tiny 32-px (64-px for the ResNet enhancer) instance trained for 3 optimizer steps
on the bundled sample images (fp32, one CPU process, no workers); the whole state dict (student,
teacher, heads, buffers) is compared exactly. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def _tokenizer() -> torch.nn.Module:
    from lightning_mim.nn import VQTokenizer

    return VQTokenizer(vocab_size=32, code_dim=8, hidden_dim=16, num_res_blocks=1, downsample=4)


def _builders() -> dict[str, Callable[[], pl.LightningModule]]:
    from lightning_mim import (
        CIMModule,
        CMAEModule,
        ConMIMModule,
        FineTuneModule,
        LinearProbeModule,
        MimCoModule,
        MoCoV3Module,
        VQTokenizerModule,
    )
    from lightning_mim.masking import BlockMasking
    from lightning_mim.optim import OptimConfig

    optim = OptimConfig(lr=1e-3, warmup_steps=1)
    return {
        "conmim": lambda: ConMIMModule(
            backbone_kwargs=TINY_VIT, proj_hidden_dim=32, proj_dim=16, momentum=0.9, optim=optim
        ),
        "cmae": lambda: CMAEModule(
            "vit_small_patch16_224", TINY_VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2, optim=optim
        ),
        "mae": lambda: CMAEModule(
            "vit_small_patch16_224",
            TINY_VIT,
            decoder_dim=16,
            decoder_depth=1,
            decoder_heads=2,
            contrastive_weight=0.0,
            optim=optim,
        ),
        "mocov3": lambda: MoCoV3Module(backbone_kwargs=TINY_VIT, proj_hidden_dim=32, proj_dim=16, optim=optim),
        "mimco": lambda: MimCoModule(
            backbone_kwargs=TINY_VIT, allow_random_teacher=True, patch_hidden_dim=32, proj_hidden_dim=32, optim=optim
        ),
        "vq_tokenizer": lambda: VQTokenizerModule(
            vocab_size=32, code_dim=8, hidden_dim=16, num_res_blocks=1, downsample=4, image_size=32
        ),
        "cim_vit_revdet": lambda: CIMModule(
            enhancer="vit_small_patch16_224",
            enhancer_kwargs=TINY_VIT,
            objective="revdet",
            tokenizer=_tokenizer(),
            generator_kwargs={"depth": 1},
            masking=BlockMasking(4, 6, 2),
            window=4,
            optim=optim,
        ),
        "cim_resnet_respix": lambda: CIMModule(
            enhancer="resnet50",
            image_size=64,
            objective="respix",
            tokenizer=_tokenizer(),
            generator_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
            masking=BlockMasking(4, 8, 2),
            window=4,
            optim=optim,
        ),
        "finetune": lambda: FineTuneModule(
            arch="vit_small_patch16_224", model_kwargs=TINY_VIT, num_classes=10, image_size=32, optim=optim
        ),
        "linear": lambda: LinearProbeModule(
            arch="vit_small_patch16_224", model_kwargs=TINY_VIT, num_classes=10, image_size=32
        ),
    }


def run(name: str, build: Callable[[], pl.LightningModule], root: Path) -> dict[str, torch.Tensor]:
    """The state dict after 3 steps of a fixed-seed run."""
    from lightning_mim.data import SampleDataModule

    pl.seed_everything(0, verbose=False)
    module = build()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root / name,
    )
    trainer.fit(module, SampleDataModule(batch_size=4, num_workers=0, train_size=12, val_size=4))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, help="write the fingerprints to this folder")
    mode.add_argument("--compare", type=Path, help="compare with the fingerprints in this folder")
    parser.add_argument("--only", nargs="*", help="methods to run (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # the same reduction order on every machine and run
    builders = _builders()
    names = args.only or list(builders)
    folder: Path = args.save or args.compare
    failed = []
    for name in names:
        state = run(name, builders[name], folder / "runs")
        file = folder / f"{name}.pt"
        if args.save:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, file)
            print(f"{name}: {len(state)} tensors saved")
            continue
        before = torch.load(file, weights_only=True)
        if set(before) != set(state):
            failed.append(name)
            gone, new = sorted(set(before) - set(state)), sorted(set(state) - set(before))
            print(f"{name}: keys differ: missing {gone[:5]}, new {new[:5]}")
            continue
        diff = {k: (before[k].double() - state[k].double()).abs().max().item() for k in state if state[k].numel()}
        worst = max(diff, key=lambda k: diff[k], default=None)
        same = all(torch.equal(before[k], state[k]) for k in state)
        verdict = "identical" if same else "DIFFERENT"
        print(f"{name}: {verdict} ({len(state)} tensors; max |diff| {diff.get(worst, 0.0):.3g} at {worst})")
        if not same:
            failed.append(name)
    if args.compare:
        print("all identical" if not failed else f"differ: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
