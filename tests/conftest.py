from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(source folder, chunks folder, prepare-data's stdout): the CLI run once on write_sample_folder's images.

    For the streaming tests (test_prepare_cli, test_writer, test_streaming), which skip without litdata.
    """
    from tests.helpers import write_sample_folder

    tmp = tmp_path_factory.mktemp("streaming")
    write_sample_folder(tmp / "src")
    cmd = [sys.executable, "-m", "lightning_mim", "prepare-data", str(tmp / "src"), str(tmp / "dst")]
    result = subprocess.run(
        [*cmd, "--chunk-bytes", "20KB", "--num-workers", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping unreadable image" in result.stderr and "broken.jpg" in result.stderr
    return tmp / "src", tmp / "dst", result.stdout
