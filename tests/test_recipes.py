"""Recipes that travel with the package: resolution by name, `lightning-mim recipes`, a wheel run anywhere."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.callbacks import RichProgressBar

from lightning_mim.cli import RECIPES, LightningMIMCLI, main, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-mim"
#: Every recipe and quickstart, by its name under RECIPES (the bases are not configs of their own).
CONFIGS = sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml") if p.parent.name != "base")


def test_a_config_name_resolves_to_the_packaged_recipe_and_a_local_file_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no checkout around
    for name in ("quickstart/conmim.yaml", "configs/quickstart/conmim.yaml"):  # the README's paths too
        args = resolve_config_args(["fit", "--config", name, "--trainer.max_steps", "2"])
        assert args == ["fit", "--config", str(RECIPES / "quickstart/conmim.yaml"), "--trainer.max_steps", "2"]
        assert "lightning-mim: config packaged recipe quickstart/conmim.yaml" in capsys.readouterr().err
    assert resolve_config_args(["--config=conmim_vitb.yaml"]) == [
        f"--config={RECIPES / name}" for name in ("conmim_vitb.yaml", "base/callbacks.yaml", "base/online_knn.yaml")
    ]  # and the bases it names, right after it
    local = tmp_path / "quickstart" / "conmim.yaml"
    local.parent.mkdir()
    local.write_text((RECIPES / "quickstart/conmim.yaml").read_text().replace("max_steps: 1000", "max_steps: 7"))
    capsys.readouterr()
    assert resolve_config_args(["--config", "quickstart/conmim.yaml"]) == ["--config", "quickstart/conmim.yaml"]
    assert f"lightning-mim: config {local}" in capsys.readouterr().err
    cli = LightningMIMCLI(args=["--config", "quickstart/conmim.yaml", "--trainer.logger", "false"], run=False)
    assert cli.trainer.max_steps == 7  # the local file, not the packaged one
    assert resolve_config_args(["--config", "nothing.yaml"]) == ["--config", "nothing.yaml"]  # jsonargparse says
    assert resolve_config_args(["--config", "../../etc/passwd"]) == ["--config", "../../etc/passwd"]


def test_recipes_command_lists_and_shows(capsys: pytest.CaptureFixture[str]) -> None:
    main(["recipes"])
    listing = capsys.readouterr().out
    names = {str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")}
    assert {"conmim_vitb.yaml", "mocov3_vits.yaml", "quickstart/conmim.yaml"} <= names
    assert all(name in listing for name in names)
    assert "Target: reproduces the paper's ImageNet-1k fine-tuning top-1 of 83.5%" in listing  # what it reproduces
    main(["recipes", "show", "conmim_vitb.yaml"])
    assert capsys.readouterr().out == (RECIPES / "conmim_vitb.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes", "show", "nope.yaml"])
    assert exit_info.value.code == 2 and "no packaged recipe 'nope.yaml'" in capsys.readouterr().err


def test_configs_in_a_checkout_are_the_packaged_recipes() -> None:
    assert (ROOT / "configs").resolve() == RECIPES
    assert sorted(p.name for p in (ROOT / "configs").rglob("*.yaml")) == sorted(p.name for p in RECIPES.rglob("*.yaml"))


def test_the_console_command_imports_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "mymodule.py").write_text(
        "from lightning_mim import ConMIMModule\n\n\nclass MyConMIM(ConMIMModule):\n    pass\n"
    )
    cmd = [str(SCRIPT), "fit", "--config", "quickstart/conmim.yaml", "--model.class_path", "mymodule.MyConMIM"]
    result = subprocess.run([*cmd, "--print_config"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: mymodule.MyConMIM" in result.stdout


def test_a_wheel_runs_a_quickstart_from_an_empty_folder(tmp_path: Path) -> None:
    """Built and installed apart from the checkout (no editable install on the path), run from an empty folder."""
    dist, target, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("lightning_mim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_mim/recipes/conmim_vitb.yaml" in names and "lightning_mim/recipes/quickstart/conmim.yaml" in names
    assert (
        "lightning_mim/recipes/base/callbacks.yaml" in names and "lightning_mim/recipes/base/online_knn.yaml" in names
    )
    install = [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    which = subprocess.run(
        [sys.executable, "-c", "import lightning_mim; print(lightning_mim.__file__)"], cwd=work, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert which.stdout.startswith(str(target)), which.stdout  # the wheel's copy, not the checkout
    cmd = [
        str(target / "bin" / "lightning-mim"), "fit", "--config", "quickstart/conmim.yaml",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--data.train_size", "64", "--data.val_size", "32", "--data.batch_size", "16",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.startswith("lightning-mim: config packaged recipe quickstart/conmim.yaml"), result.stderr[:500]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in result.stdout + result.stderr
    assert (work / "runs/quickstart/conmim/checkpoints/last.ckpt").is_file()
    shown = [str(target / "bin" / "lightning-mim"), "fit", "--config", "mae_vitb.yaml", "--print_config"]
    result = subprocess.run(shown, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"config base {target / 'lightning_mim/recipes/base/online_knn.yaml'}" in result.stderr  # the wheel's
    assert "class_path: lightning_mim.callbacks.Preemption" in result.stdout  # from the base
    assert "class_path: lightning_mim.callbacks.OnlineKNN" in result.stdout


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    commands = ("fit", "validate", "export CKPT OUTDIR", "convert FORMAT SRC DST", "prepare-data SRC DST")
    for command in (*commands, "recipes [show NAME]"):
        assert command in out, command


def test_a_step_limited_run_shows_its_steps_not_epoch_minus_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = LightningMIMCLI(args=["--config", "quickstart/conmim.yaml", "--trainer.logger", "false"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RichProgressBar)
    bar.setup(cli.trainer, cli.model, "fit")
    description = bar._get_train_description(0)
    assert "-2" not in description and "Epoch 0 (of a 1000-step run)" in description  # max_epochs -1, max_steps 1000
    cli = LightningMIMCLI(
        args=["--config", "quickstart/conmim.yaml", "--trainer.logger", "false", "--trainer.max_epochs", "3"],
        run=False,
    )
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RichProgressBar)
    bar.setup(cli.trainer, cli.model, "fit")
    assert bar._get_train_description(1).strip() == "Epoch 1/2"  # epoch-limited runs keep Lightning's label


class _ParseOnly(LightningMIMCLI):
    """The merged config of a recipe, without building model, data and trainer."""

    def instantiate_classes(self) -> None:
        pass


def merged_callbacks(*args: str) -> list[tuple[str, dict[str, Any]]]:
    """(class_path, init_args) of the callbacks that ``--config`` args resolve and merge to."""
    args = (*args, "--data.root", ".") if "quickstart" not in " ".join(args) else args  # ImageNet: needs one
    cli = _ParseOnly(args=[*args, "--trainer.logger", "false"], run=False)
    return [(c.class_path, dict(c.get("init_args") or {})) for c in cli.config.trainer.callbacks]


CHECKPOINT, PREEMPTION = "lightning.pytorch.callbacks.ModelCheckpoint", "lightning_mim.callbacks.Preemption"
#: The base callbacks, in order, after the recipe's own (its checkpoints): what every recipe ran before the bases.
BASE = [
    PREEMPTION,
    "lightning_mim.callbacks.NonFiniteGuard",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning_mim.callbacks.MFUMonitor",
    "lightning.pytorch.callbacks.TQDMProgressBar",
]
KNN = "lightning_mim.callbacks.OnlineKNN"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_merges_its_bases_callbacks_after_its_own(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPES.parent)  # no local files named like a recipe
    classes = [class_path for class_path, _ in merged_callbacks("--config", name)]
    assert {PREEMPTION, "lightning_mim.callbacks.NonFiniteGuard"} <= set(classes)  # "in every config"
    if name.startswith("quickstart/"):
        return
    pretraining = not name.startswith(("finetune_", "linear_", "vq_"))
    checkpoints = [CHECKPOINT] * (2 if pretraining else 1)  # the archive and the every-1000-steps last.ckpt
    assert classes == checkpoints + BASE + ([KNN] if pretraining else [])


def test_a_shown_recipe_runs_from_any_folder_with_the_packaged_bases_and_a_base_beside_it_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["recipes", "show", "conmim_vitb.yaml"])
    (tmp_path / "mine.yaml").write_text(capsys.readouterr().out.replace("every_n_epochs: 20", "every_n_epochs: 7"))
    args = resolve_config_args(["fit", "--config", "mine.yaml"])
    assert args == ["fit", "--config", "mine.yaml", "--config", str(RECIPES / "base/callbacks.yaml"),
                    "--config", str(RECIPES / "base/online_knn.yaml")]  # fmt: skip
    assert "config base " + str(RECIPES / "base/callbacks.yaml") + ", named by mine.yaml" in capsys.readouterr().err
    callbacks = merged_callbacks("--config", "mine.yaml")
    assert callbacks[0][1]["every_n_epochs"] == 7 and [c for c, _ in callbacks[2:]] == [*BASE, KNN]
    (tmp_path / "base").mkdir()
    (tmp_path / "base/online_knn.yaml").write_text(
        f"trainer:\n  callbacks+:\n    - {{class_path: {KNN}, init_args: {{k: 3}}}}\n"
    )
    assert merged_callbacks("--config", "mine.yaml")[-1][1]["k"] == 3  # the base beside it, not the packaged one
    (tmp_path / "other.yaml").write_text("# lightning-mim base: base/nothing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"names the base 'base/nothing\.yaml'"):
        resolve_config_args(["--config", "other.yaml"])


def _stated(spec: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, signature default) of each argument that a config's class spec states.

    Nested class specs (``masking``) and dataclass arguments (``optim``, field by field) are walked.
    """
    module, _, name = spec["class_path"].rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    for key, value in (spec.get("init_args") or {}).items():
        default = parameters[key].default
        if isinstance(value, dict) and "class_path" in value:
            yield from _stated(value, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(default) and isinstance(value, dict):
            yield from ((f"{prefix}{key}.{f}", v, getattr(default, f)) for f, v in value.items())
        else:
            yield f"{prefix}{key}", value, default


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


#: What each config sets apart from its module's signature defaults (model arguments, dotted into
#: ``optim`` and ``masking``). Every other model value a config states repeats a default (in the
#: recipes, the official value, stated as documentation) and must equal it: a default that changes
#: fails here until the configs that state it agree. An argument whose default is None is unset, so a
#: value stated for it is always a choice and is not listed (``recipe_batch_size``, ``*_kwargs``).
CHOICES = {
    "cim_resnet50_respix.yaml": "enhancer",
    "cim_vitb_revdet.yaml": "objective",
    "cmae_vitb.yaml": "masking.mask_ratio",
    "conmim_vitl.yaml": "backbone optim.lr optim.warmup_epochs",
    "conmim_vitl_fsdp.yaml": "backbone grad_checkpointing optim.lr optim.warmup_epochs",
    "finetune_resnet50.yaml": "drop_path_rate mixup label_smoothing random_erasing image_size randaugment optimizer "
    "optim.lr optim.base_batch_size optim.weight_decay optim.warmup_epochs",
    "finetune_vits.yaml": "optim.layer_decay",
    "mae_vitb.yaml": "contrastive_weight optim.decay_rule",
    "mimco_vitb.yaml": "backbone",
    "mocov3_vitb.yaml": "backbone",
    "quickstart/cim.yaml": "enhancer objective masking.input_size masking.num_masking_patches "
    "masking.min_num_patches window optim.base_batch_size",
    "quickstart/cmae.yaml": "backbone decoder_dim decoder_depth feature_decoder_depth decoder_heads proj_hidden_dim "
    "proj_dim momentum optim.lr optim.base_batch_size optim.min_lr",
    "quickstart/conmim.yaml": "proj_hidden_dim momentum crop_scale init eval_encoder optim.lr",
    "quickstart/finetune.yaml": "num_classes image_size mixup cutmix optim.lr optim.base_batch_size "
    "optim.warmup_epochs",
    "quickstart/linear.yaml": "num_classes pool image_size optim.lr optim.base_batch_size optim.warmup_epochs",
    "quickstart/mimco.yaml": "patch_hidden_dim proj_hidden_dim optim.base_batch_size",
    "quickstart/mocov3.yaml": "proj_hidden_dim optim.lr optim.base_batch_size optim.min_lr",
    "quickstart/vq_tokenizer.yaml": "vocab_size hidden_dim downsample image_size crop_scale optim.lr",
}


@pytest.mark.parametrize("name", CONFIGS)
def test_model_values_a_config_states_equal_the_defaults_except_its_listed_choices(name: str) -> None:
    model = yaml.safe_load((RECIPES / name).read_text())["model"]
    differ = {key for key, value, default in _stated(model) if default is not None and _plain(value) != _plain(default)}
    assert differ == set(CHOICES.get(name, "").split()), "update the config (or CHOICES, for a deliberate choice)"
