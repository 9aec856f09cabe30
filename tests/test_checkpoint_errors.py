"""Checkpoint files that cannot be written or read: the error names the file and the cause."""

from __future__ import annotations

import errno
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mim.checkpoint import io as checkpoint_io
from lightning_mim.checkpoint.io import AtomicCheckpointIO
from lightning_mim.cli import DEBUG_ENV, main

ROOT = Path(__file__).resolve().parents[1]


def test_a_truncated_checkpoint_is_named_and_called_truncated(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=rf"checkpoint {path} cannot be read .*truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_the_cli_reports_a_truncated_checkpoint_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # the start of a zip archive, then nothing
    args = [
        "fit", "--config", str(ROOT / "configs/quickstart/conmim.yaml"), "--trainer.max_steps", "1",
        "--trainer.logger", "false", "--data.train_size", "32", "--data.val_size", "16", "--data.batch_size", "16",
        "--data.num_workers", "0", "--ckpt_path", str(broken),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"lightning-mim fit: error: checkpoint {broken} cannot be read" in err and "Traceback" not in err


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    previous = path.read_bytes()

    def short_write(obj: Any, f: Any) -> None:  # what torch.save reports when the disk fills up mid-write
        f.write(b"\x00" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 30935488 vs 30935380")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_io.torch, "save", short_write)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=rf"could not write checkpoint {path}: the disk is full") as error:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert error.value.errno == errno.ENOSPC and "the previous last.ckpt is unchanged" in str(error.value)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda folder: usage(10**9, 0, 10**9))
    with pytest.raises(OSError, match=rf"could not write checkpoint {path}: .*unexpected pos"):  # another cause
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
