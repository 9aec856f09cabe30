"""``lightning-mim prepare-data SRC DST``: the command line over the writer, and its summary.

``prepared`` (tests/conftest.py) runs it once on tests.helpers.write_sample_folder's images (200
training images in 10 classes plus one broken file, 50 validation images) and checks that it exits 0
and names the broken file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("litdata")


def test_prepare_data_prints_a_summary_and_the_fit_command(prepared: tuple[Path, Path, str]) -> None:
    _, dst, stdout = prepared
    assert "train: 200 images (1 unreadable skipped, 10 classes)" in stdout
    assert "val: 50 images (0 unreadable skipped, 10 classes)" in stdout
    assert f"--data.init_args.input_dir {dst}" in stdout
