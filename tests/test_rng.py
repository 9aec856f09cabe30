"""The random-stream registry and the lazy package exports."""

from __future__ import annotations

import subprocess
import sys

from lightning_mim._rng import _GLOBAL_STREAM, Stream


def test_stream_ids_and_their_global_offsets_never_collide() -> None:
    ids = [int(s) for s in Stream]
    assert len(set(ids)) == len(ids)
    # a CountedStream seeds the global generators from id + _GLOBAL_STREAM: no id may equal one of those
    assert not set(ids) & {i + _GLOBAL_STREAM for i in ids}
    # the values every run and checkpoint depend on (changing one changes every run's draws)
    assert (Stream.CONMIM_MASKS, Stream.CMAE_MASKS, Stream.MIMCO_MASKS, Stream.CIM_MASKS) == (1, 2, 3, 4)
    assert (Stream.STEPS, Stream.VIEWS, Stream.KNN_BANK) == (0x5354, 0x5649, 23)


def test_importing_a_part_loads_neither_lightning_timm_nor_wandb() -> None:
    code = (
        "import sys, lightning_mim.losses, lightning_mim.masking, lightning_mim.checkpoint.files\n"
        "heavy = sorted(m for m in ('lightning', 'timm', 'wandb') if m in sys.modules)\n"
        "methods = sorted(m for m in sys.modules if m.startswith('lightning_mim.methods.'))\n"
        "print(heavy, len(methods))\n"
        "import lightning_mim\n"
        "print(lightning_mim.ConMIMModule.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    heavy, methods = out.stdout.splitlines()[0].rsplit(" ", 1)
    assert heavy == "[]" and methods == "0", out.stdout  # no method module either
    assert out.stdout.splitlines()[1] == "lightning_mim.methods.conmim"  # lazily imported on first use


def test_the_checkpoint_package_imports_no_method() -> None:
    code = (
        "import sys, lightning_mim.checkpoint.weights, lightning_mim.checkpoint.io\n"
        "print(sorted(m for m in sys.modules if m.startswith(('lightning_mim.methods.', 'lightning_mim.export'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
