"""Two CPU processes (gloo): gathered InfoNCE is exact, the EMA teacher stays identical across ranks,
and OnlineKNN on 2 ranks equals 1 rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_mim.losses import info_nce

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = WORKER.parents[1]


def run(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> None:
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]


METHODS = ["conmim", "cmae", "mocov3", "mimco", "vq_tokenizer", "cim"]
WITH_KNN = [m for m in METHODS if m != "vq_tokenizer"]  # the tokenizer has no features to probe


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method trained by the worker on 2 ranks (then info_nce in their process group), and those
    with kNN on 1 rank: one launch each."""
    root = tmp_path_factory.mktemp("ddp")
    for folder, devices, cases in (("two", "2", [*METHODS, "info_nce"]), ("one", "1", WITH_KNN)):
        (root / folder).mkdir()
        run([str(WORKER), ",".join(cases), str(root / folder)], env={"DEVICES": devices}, timeout=900)
    return root


def test_info_nce_two_ranks_equals_one_process_on_the_whole_batch(runs: Path) -> None:
    results = json.loads((runs / "two" / "info_nce.json").read_text())
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    for key_grad in (False, True):
        q = query.clone().requires_grad_(True)
        k = key.clone().requires_grad_(key_grad)
        loss = info_nce(q, k, 0.2)
        loss.backward()
        entry = results[str(key_grad)]
        assert entry["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert q.grad is not None and torch.allclose(torch.tensor(entry["q_grad"]), q.grad, atol=1e-6)
        if key_grad:
            assert k.grad is not None and torch.allclose(torch.tensor(entry["k_grad"]), k.grad, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_teacher_identical_and_knn_exact(method: str, runs: Path) -> None:
    rank0 = json.loads((runs / "two" / f"{method}.rank0").read_text())
    rank1 = json.loads((runs / "two" / f"{method}.rank1").read_text())
    assert rank0["teacher_checksum"] == rank1["teacher_checksum"]  # bit-identical teachers
    if method == "mimco":  # the image-level loss uses every rank's keys: equal to one process on 2B
        assert rank0["image_loss_gap"] < 1e-5 and rank1["image_loss_gap"] < 1e-5
    if method == "vq_tokenizer":  # the EMA codebook is summed over ranks and rank 0's restarts broadcast
        assert rank0["knn"] == [] and rank1["knn"] == []
        return
    one = json.loads((runs / "one" / f"{method}.rank0").read_text())
    # the kNN before training does not depend on the data order: 2 ranks must give the 1-rank value
    assert rank0["knn"][0][1] == pytest.approx(one["knn"][0][1], abs=1e-6)
    assert rank0["knn"][0][1] == rank1["knn"][0][1]
