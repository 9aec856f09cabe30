"""The CLI's resume rule: the config and command line decide the model, the checkpoint restores state.

The same for ``--ckpt_path last`` and ``--ckpt_path FILE``: a checkpoint of another method fails before
training with one line naming both methods; hyperparameters that differ are listed in one warning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mim import ConMIMModule
from lightning_mim.cli import DEBUG_ENV, LightningMIMCLI, main

ROOT = Path(__file__).resolve().parents[1]
CONMIM_LAST = "runs/quickstart/conmim/checkpoints/last.ckpt"


def quickstart(config: str, steps: int, *extra: str) -> list[str]:
    """A quickstart config, shortened to ``steps`` steps on a subset, with no validation.

    Its checkpoint callback writes ``last.ckpt`` to ``runs/quickstart/conmim/checkpoints`` (ConMIM) or
    ``run/checkpoints`` (CMAE)."""
    return [
        "fit", "--config", str(ROOT / "configs/quickstart" / config),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.default_root_dir", "run",
        "--data.train_size", "64", "--data.val_size", "16", "--data.batch_size", "16", "--data.num_workers", "0",
        *extra,
    ]  # fmt: skip


def test_a_checkpoint_of_another_method_fails_before_training_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    LightningMIMCLI(args=quickstart("cmae.yaml", 1))
    cmae_checkpoint = tmp_path / "run/checkpoints/last.ckpt"
    assert cmae_checkpoint.is_file()
    written = cmae_checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(quickstart("conmim.yaml", 2, "--ckpt_path", str(cmae_checkpoint)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("lightning-mim fit: error:"))
    assert "not a ConMIM checkpoint (found: cmae)" in line and "CMAE module" in line  # both methods named
    assert "Traceback" not in err and "`Trainer.fit` stopped" not in err  # no training step ran
    assert cmae_checkpoint.stat().st_mtime_ns == written  # nothing was written over it
    monkeypatch.setenv(DEBUG_ENV, "1")  # the traceback, for a bug report
    with pytest.raises(ValueError, match=r"not a ConMIM checkpoint \(found: cmae\)"):
        main(quickstart("conmim.yaml", 2, "--ckpt_path", str(cmae_checkpoint)))


@pytest.mark.parametrize("which", ["file", "last"])
def test_the_command_line_decides_the_model_and_differences_are_listed(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    LightningMIMCLI(args=quickstart("conmim.yaml", 2))  # temperature 0.1, the default
    saved = torch.load(tmp_path / CONMIM_LAST, weights_only=True)
    assert saved["hyper_parameters"]["temperature"] == 0.1
    ckpt_path = str(tmp_path / CONMIM_LAST) if which == "file" else "last"
    with pytest.warns(UserWarning, match=r"temperature: checkpoint 0\.1, this run 0\.5") as record:
        cli = LightningMIMCLI(args=quickstart("conmim.yaml", 3, "--model.temperature", "0.5", "--ckpt_path", ckpt_path))
    listed = [w for w in record if "differ from the checkpoint" in str(w.message)]
    assert len(listed) == 1 and "crop_scale" not in str(listed[0].message)  # only what differs, once
    assert type(cli.model) is ConMIMModule and cli.model.temperature == 0.5
    assert cli.trainer.global_step == 3  # the state was restored: one more step
    assert torch.load(tmp_path / CONMIM_LAST, weights_only=True)["hyper_parameters"]["temperature"] == 0.5
