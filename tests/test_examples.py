"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_module_with_callbacks_example(tmp_path: Path) -> None:
    script = ROOT / "examples" / "own_module_with_callbacks.py"
    smoke = ["--max-steps", "2", "--batch-size", "32", "--train-size", "256", "--val-size", "128"]
    result = subprocess.run(
        [sys.executable, str(script), *smoke], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 2"]  # kNN before training and at the end
