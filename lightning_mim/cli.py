"""The ``lightning-mim`` command: a LightningCLI over lightning-mim's modules.

    lightning-mim fit --config configs/conmim_vitb.yaml --data.root /data/imagenet
    lightning-mim fit --config configs/quickstart/conmim.yaml
    lightning-mim fit --config configs/conmim_vitb.yaml --print_config
    lightning-mim export runs/conmim_vitb/checkpoints/last.ckpt exported/conmim_vitb [--which teacher]
    lightning-mim convert mocov3 vit-s-300ep.pth.tar mocov3_vits.ckpt  # official weights: MimCo's teacher
    lightning-mim prepare-data /data/imagenet /data/imagenet-chunks   # litdata chunks for StreamingDataModule
    lightning-mim recipes                      # the packaged recipes and what each reproduces
    lightning-mim recipes show conmim_vitb.yaml > my_recipe.yaml

The recipes ship inside the package (``lightning_mim/recipes``; ``configs/`` in a checkout links to
it): ``--config NAME.yaml`` (or ``configs/NAME.yaml``) that is not a file in the working directory
names the packaged recipe, so the commands above work from any folder and from a wheel. A local file
always wins; the first line printed says which was used. A config may name bases in lines of their own,
``# lightning-mim base: base/callbacks.yaml``: each is read right after it, as one more ``--config``
(see :func:`resolve_config_args`). As with ``python -m lightning_mim``, the
working directory is importable, so ``--model.class_path mymodule.MyConMIM`` finds ``./mymodule.py``.

Any LightningModule / LightningDataModule can be named by ``class_path``; lightning-mim's are
importable by their short names (``ConMIMModule``, ``ImageNetDataModule``, ``SampleDataModule``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

import lightning_mim.callbacks
import lightning_mim.methods
from lightning_mim.checkpoint.io import AtomicCheckpointIO
from lightning_mim.data import ImageNetDataModule, SampleDataModule  # noqa: F401 - short names resolve

__all__ = ["LightningMIMCLI", "main"]

# LightningCLI resolves short class names (--model ConMIMModule, OnlineKNN) among the subclasses
# already imported: import every method and callback the packages export (they load lazily).
for _package in (lightning_mim.methods, lightning_mim.callbacks):
    for _name in _package.__all__:
        getattr(_package, _name)

#: Set to 1 for the full traceback of a user error (a bad config value, a missing or wrong checkpoint).
DEBUG_ENV = "LIGHTNING_MIM_DEBUG"
#: The packaged recipes and quickstarts.
RECIPES = Path(__file__).resolve().parent / "recipes"


def packaged_recipe(name: str) -> Path | None:
    """The packaged recipe ``name``, or None.

    ``name`` as ``conmim_vitb.yaml`` or ``quickstart/conmim.yaml``; a leading ``configs/`` as in a
    checkout is allowed.
    """
    relative = name.removeprefix("./").removeprefix("configs/")
    path = (RECIPES / relative).resolve()
    return path if path.is_file() and path.suffix == ".yaml" and RECIPES in path.parents else None


#: A line of a config that names a base to read after it: ``# lightning-mim base: base/callbacks.yaml``.
BASE_LINE = re.compile(r"^\s*#\s*lightning-mim base:\s*(\S+)", re.MULTILINE)


def config_bases(config: Path) -> list[Path]:
    """The bases that ``config`` names in ``# lightning-mim base: NAME`` lines, in their order.

    NAME is a file beside ``config`` (relative to its folder) or else a packaged one (``base/callbacks.yaml``).
    A base appends to lists (``trainer: {callbacks+: [...]}``) and sets nothing else, since it is read
    after the config that names it; bases are not read for further bases.
    """
    bases = []
    for name in BASE_LINE.findall(config.read_text()):
        beside = config.parent / name
        base = beside if beside.is_file() else packaged_recipe(name)
        if base is None:
            raise FileNotFoundError(f"{config} names the base {name!r}: no such file beside it or packaged")
        bases.append(base)
    return bases


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with packaged recipes for ``--config`` names that are not files, and their bases.

    Each ``--config NAME`` that is not a file is replaced by the packaged recipe of that name, and
    followed by a ``--config`` for each base that the config names (:func:`config_bases`).

    A local file always wins. On rank 0 the first line printed says which file each ``--config`` is.
    A base comes right after its config, so that its ``callbacks+`` appends to the config's callbacks
    (jsonargparse replaces a list that a later config sets, and appends one given as ``key+``).
    """
    resolved: list[str] = []
    at = 0
    while at < len(args):
        arg = args[at]
        if arg == "--config" and at + 1 < len(args):
            value, joined, at = args[at + 1], False, at + 2
        elif arg.startswith("--config="):
            value, joined, at = arg.partition("=")[2], True, at + 1
        else:
            resolved.append(arg)
            at += 1
            continue
        local = Path(value).expanduser()
        recipe = None if local.is_file() else packaged_recipe(value)
        config = recipe or (local if local.is_file() else None)
        bases = config_bases(config) if config is not None else []
        for path in [str(recipe) if recipe else value, *map(str, bases)]:
            resolved += [f"--config={path}"] if joined else ["--config", path]
        if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
            said = f"packaged recipe {recipe.relative_to(RECIPES)} ({recipe})" if recipe else f"{local.resolve()}"
            sys.stderr.write(f"lightning-mim: config {said}\n")
            for base in bases:
                sys.stderr.write(f"lightning-mim: config base {base.resolve()}, named by {Path(value).name}\n")
    return resolved


_MISSING = object()


class _ConfigDecidesHyperparameters(Callback):
    """On resume, lists once the hyperparameters in which the checkpoint and this run differ.

    The run's config and command line build the model; the checkpoint only restores its state
    (weights, optimizer, schedule, loop and random streams). Lightning's CLI would instead re-apply a
    checkpoint's stored hyperparameters when ``--ckpt_path`` names a file (not for ``last``), even
    replacing the configured class; lightning-mim does the same for both.
    """

    def on_load_checkpoint(self, trainer: Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("hyper_parameters") or {}
        current = dict(pl_module.hparams)
        names = sorted(k for k in {*stored, *current} if not k.startswith("_"))
        differ = [k for k in names if _plain(stored.get(k, _MISSING)) != _plain(current.get(k, _MISSING))]
        if differ:
            listed = "; ".join(f"{k}: checkpoint {_shown(stored, k)}, this run {_shown(current, k)}" for k in differ)
            rank_zero_warn(
                f"resuming with this run's hyperparameters where they differ from the checkpoint's "
                f"(the config and command line decide the model, the checkpoint restores its state): {listed}"
            )


#: The commands besides LightningCLI's, listed by ``lightning-mim --help``.
EPILOG = """other commands:
  convert FORMAT SRC DST [--export DIR]          an official checkpoint (mocov3, mae, conmim, cmae) as ours
  export CKPT OUTDIR [--which student|teacher]   write a checkpoint's encoder for timm
  prepare-data SRC DST                           encode an image folder into litdata chunks (streaming)
  recipes [show NAME]                            list the packaged recipes, or print one
each has its own --help. Set LIGHTNING_MIM_DEBUG=1 for the traceback of an error."""


class _StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, with the steps of a step-limited run in its label.

    Lightning labels a run with ``max_epochs=-1`` "Epoch 0/-2"; here it reads "Epoch 0 (of a
    1000-step run)" instead.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            description = f"Epoch {current_epoch}" + (
                f" (of a {trainer.max_steps}-step run)" if trainer.max_steps and trainer.max_steps > 0 else ""
            )
            return f"{description:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


def _plain(value: Any) -> Any:
    """Comparable form: tuples and lists alike."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(values: dict[str, Any], key: str) -> str:
    return "(absent)" if key not in values else repr(values[key])


class LightningMIMCLI(LightningCLI):
    """LightningCLI with lightning-mim's defaults.

    Model and data are chosen in the config by ``class_path`` (subclass mode); methods configure
    their own optimiser and schedule, so the CLI's ``--optimizer`` / ``--lr_scheduler`` are off.
    The resolved config is saved next to the logs of every run. Checkpoints are written atomically
    and loaded with ``weights_only=True`` (:class:`~lightning_mim.checkpoint.io.AtomicCheckpointIO`)
    unless ``--trainer.plugins`` names another CheckpointIO.

    Example::

        cli = LightningMIMCLI(args=["--config", "configs/quickstart/conmim.yaml"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        if args is None:  # the command line: packaged recipes by name (see the module docstring)
            sys.argv[1:] = resolve_config_args(sys.argv[1:])
        elif isinstance(args, list):
            args = resolve_config_args([str(a) for a in args])
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(pl.LightningModule, pl.LightningDataModule, args=args, run=run, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """The config decides the model, also with ``--ckpt_path FILE`` (see ``_ConfigDecidesHyperparameters``).

        Lightning's CLI re-applies the hyperparameters stored in a checkpoint file over the config
        (but not those of ``last``): a checkpoint of another method would silently replace the
        configured model, and command-line overrides would be dropped. Here nothing is re-applied; a
        checkpoint of another method fails when it is loaded, naming both methods.
        """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        callbacks = [*callbacks, _ConfigDecidesHyperparameters()]
        has_bar = any(isinstance(c, ProgressBar) for c in [*callbacks, *(config.get("callbacks") or [])])
        if not has_bar and config.get("enable_progress_bar") is not False:
            from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

            if _RICH_AVAILABLE:  # Lightning's default bar then, with steps for step-limited runs
                callbacks.append(_StepProgressBar())
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)


def export_main(argv: list[str]) -> None:
    """``lightning-mim export CKPT OUTDIR [--which student|teacher]``: the encoder for timm."""
    from lightning_mim.export import to_timm

    parser = argparse.ArgumentParser(
        prog="lightning-mim export",
        description="Write a pre-trained encoder as OUTDIR/model.safetensors + OUTDIR/config.json for timm.",
    )
    parser.add_argument("checkpoint", help="a lightning-mim method checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument(
        "--which",
        choices=["student", "teacher"],
        default=None,
        help="encoder to export (default: the method's recommended one; ConMIM: teacher, others: student)",
    )
    options = parser.parse_args(argv)
    try:
        out = to_timm(options.checkpoint, options.out_dir, options.which)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"lightning-mim export: error: {err}\n")
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out / 'model.safetensors'} ({config['method']}, {config['which']} encoder)")
    print(
        f"load it with: timm.create_model({config['architecture']!r}, pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay={{'file': {str(out / 'model.safetensors')!r}}}, **{config['model_args']!r})"
    )


def convert_main(argv: list[str]) -> None:
    """``lightning-mim convert FORMAT SRC DST [--export DIR]``: an official checkpoint as ours."""
    from lightning_mim.convert import OFFICIAL_FORMATS, convert
    from lightning_mim.export import to_timm

    parser = argparse.ArgumentParser(
        prog="lightning-mim convert",
        description="Write an official checkpoint (read with weights_only=True) as a lightning-mim checkpoint.",
    )
    parser.add_argument("format", choices=OFFICIAL_FORMATS, help="the official code that wrote SRC")
    parser.add_argument("src", help="the official file (e.g. vit-s-300ep.pth.tar)")
    parser.add_argument("dst", help="the lightning-mim checkpoint to write (.ckpt)")
    parser.add_argument("--export", metavar="DIR", default=None, help="also write its encoder for timm to DIR")
    parser.add_argument(
        "--teacher", metavar="COPY", default=None, help="conmim: the teacher file (checkpoint_copy-N.pth) of SRC"
    )
    options = parser.parse_args(argv)
    try:
        out = convert(options.src, options.dst, options.format, options.teacher)
        exported = to_timm(out, options.export) if options.export else None
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"lightning-mim convert: error: {err}\n")
    print(f"wrote {out}")
    if exported is not None:
        print(f"wrote {exported / 'model.safetensors'} and {exported / 'config.json'}")


def recipes_main(argv: list[str]) -> None:
    """``lightning-mim recipes`` (list, with what each reproduces) and ``lightning-mim recipes show NAME``."""
    parser = argparse.ArgumentParser(
        prog="lightning-mim recipes", description="The recipes and quickstarts that ship with lightning-mim."
    )
    parser.add_argument("show", nargs="?", choices=["show"], help="print one recipe as it is written, to copy and edit")
    parser.add_argument("name", nargs="?", help="the recipe to show, e.g. conmim_vitb.yaml or quickstart/conmim.yaml")
    options = parser.parse_args(argv)
    if options.show:
        recipe = packaged_recipe(options.name or "")
        if recipe is None:
            parser.exit(
                2, f"lightning-mim recipes: error: no packaged recipe {options.name!r}; see `lightning-mim recipes`\n"
            )
        sys.stdout.write(recipe.read_text())
        return
    recipes = [p for p in RECIPES.rglob("*.yaml") if p.parent != RECIPES / "base"]
    for path in sorted(recipes, key=lambda p: (p.parent != RECIPES, str(p))):
        lines = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")]
        title = lines[0] if lines else ""
        target = next((line for line in lines if line.startswith("Target:")), "")
        print(f"{path.relative_to(RECIPES)!s:32s} {title}" + (f"\n{'':32s} {target}" if target else ""))
    bases = ", ".join(str(p.relative_to(RECIPES)) for p in sorted((RECIPES / "base").glob("*.yaml")))
    print(
        f"\nbases, read after each recipe that names them (`# lightning-mim base: NAME`): {bases}"
        "\nrun one from any folder: lightning-mim fit --config NAME.yaml; "
        "copy one to edit: lightning-mim recipes show NAME.yaml > my.yaml "
        "(its bases stay packaged; --print_config prints the whole config)"
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-mim`` and ``python -m lightning_mim``."""
    argv = sys.argv[1:] if args is None else args
    # As ``python -m`` does: modules in the working directory are importable (``--model.class_path mymodule.X``).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if isinstance(argv, list) and argv[:1] == ["recipes"]:
        recipes_main([str(a) for a in argv[1:]])
        return
    if isinstance(argv, list) and argv[:1] == ["convert"]:
        convert_main([str(a) for a in argv[1:]])
        return
    if isinstance(argv, list) and argv[:1] == ["export"]:
        export_main([str(a) for a in argv[1:]])
        return
    if isinstance(argv, list) and argv[:1] == ["prepare-data"]:
        from lightning_mim.data.prepare_cli import prepare_data_main  # needs litdata (the `streaming` extra)

        prepare_data_main([str(a) for a in argv[1:]])
        return
    try:
        LightningMIMCLI(args=args)
    except SIGTERMException:  # preempted: the Preemption callback wrote the checkpoint
        sys.exit(143)  # 128 + SIGTERM, what schedulers expect from a job stopped by a signal
    except (ValueError, FileNotFoundError) as err:
        # What the modules and data raise for bad input (a config value, a missing or wrong
        # checkpoint, missing data) already names the problem: one line, not a chained traceback.
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        command = argv[0] if isinstance(argv, list) and argv and not str(argv[0]).startswith("-") else "fit"
        sys.stderr.write(f"lightning-mim {command}: error: {err}\n({DEBUG_ENV}=1 shows the traceback)\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
