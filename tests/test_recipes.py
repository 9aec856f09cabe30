"""Recipes that travel with the package: resolution by name, `lightning-mim recipes`, a wheel run anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lightning_mim.cli import RECIPES, LightningMIMCLI, main, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-mim"


def test_a_config_name_resolves_to_the_packaged_recipe_and_a_local_file_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no checkout around
    for name in ("quickstart/conmim.yaml", "configs/quickstart/conmim.yaml"):  # the README's paths too
        args = resolve_config_args(["fit", "--config", name, "--trainer.max_steps", "2"])
        assert args == ["fit", "--config", str(RECIPES / "quickstart/conmim.yaml"), "--trainer.max_steps", "2"]
        assert "lightning-mim: config packaged recipe quickstart/conmim.yaml" in capsys.readouterr().err
    assert resolve_config_args(["--config=conmim_vitb.yaml"]) == [f"--config={RECIPES / 'conmim_vitb.yaml'}"]
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


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "export CKPT OUTDIR", "prepare-data SRC DST", "recipes [show NAME]"):
        assert command in out, command


def test_a_step_limited_run_shows_its_steps_not_epoch_minus_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = LightningMIMCLI(args=["--config", "quickstart/conmim.yaml", "--trainer.logger", "false"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert bar is not None
    bar.setup(cli.trainer, cli.model, "fit")
    description = bar._get_train_description(0)  # type: ignore[attr-defined]
    assert "-2" not in description and "Epoch 0 (of a 1000-step run)" in description  # max_epochs -1, max_steps 1000
    cli = LightningMIMCLI(
        args=["--config", "quickstart/conmim.yaml", "--trainer.logger", "false", "--trainer.max_epochs", "3"],
        run=False,
    )
    bar = cli.trainer.progress_bar_callback
    bar.setup(cli.trainer, cli.model, "fit")
    assert bar._get_train_description(1).strip() == "Epoch 1/2"  # epoch-limited runs keep Lightning's label
