"""Soak test: the ConMIM quickstart for 2,000 optimizer steps without memory or file-descriptor growth.

The documented command (``python -m lightning_mim fit --config configs/quickstart/conmim.yaml``) runs in a
subprocess with its data module, loader worker, callbacks (OnlineKNN and VisualDiagnostics every 250 steps,
ModelCheckpoint) and CSV logging; only the step count, the batch size and the loggers are overridden:

- ``--trainer.max_steps 2000`` (the quickstart stops at 1,000; ``max_epochs`` is already -1).
- ``--data.batch_size 32`` instead of 128: on the 2 shared CPU cores of the development machine a step at 128
  takes ~0.5 s (2,000 steps: > 15 minutes) and one at 64 up to 0.6 s when the cores are busy; at 32 the run
  still crosses 7 epochs (281 steps each) and 8 validations.
- the CSV logger only (the offline wandb logger starts a service process outside what is measured).

Meanwhile the test samples, every few seconds, the process tree's resident memory (the sum of ``VmRSS`` of
the CLI process and its DataLoader workers; a forked worker's shared pages count in both, which is stable
since the workers are persistent) and its open file descriptors (``/proc/<pid>/fd``). Warm-up is the first
20% of the run's duration (imports, the first kNN evaluation, the first epochs touching the dataset), or
longer when the first validation (step 250) ends later: it starts the validation loader's persistent worker,
a third process of ~600 MiB RSS and ~25 descriptors, once. After warm-up, resident memory must stay within
10% of its value at the end of warm-up, no process may be added, and the descriptor count at the end must be
at most the count at the end of warm-up + 2. Single samples vary (validation adds up to ~100 MiB to the CLI
process for a few seconds; a checkpoint, CSV or PNG being written, 1-3 descriptors), so "at the end of
warm-up" is the median of the first 10 samples after it and "at the end" the median of the last 10 samples
before the loader workers shut down.

Run with ``pytest -m slow tests/test_soak.py -s`` (prints the samples): 10 minutes on 2 CPU cores, 25 when
other jobs share them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2000
INTERVAL_S = 3.0
TIMEOUT_S = 40 * 60
WARMUP_FRACTION = 0.2
RSS_TOLERANCE = 0.10
FD_SLACK = 2
WINDOW = 10  # samples whose median is "the value at the end of warm-up" / "at the end"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc (Linux)"),
]


@dataclass
class Sample:
    t: float  # seconds since the start
    rss_mib: float  # the whole tree
    fds: int  # the whole tree
    procs: int  # processes in the tree
    main_rss_mib: float  # the CLI process alone


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from the parent field of every /proc/<n>/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children(current))
    return pids


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # exited, or a zombie (no VmRSS line)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sample(pid: int, t: float) -> Sample:
    pids = tree(pid)
    rss = {p: rss_kib(p) for p in pids}
    return Sample(
        t=t,
        rss_mib=sum(rss.values()) / 1024,
        fds=sum(fd_count(p) for p in pids),
        procs=len(pids),
        main_rss_mib=rss[pid] / 1024,
    )


def row(s: Sample) -> str:
    """One line of the printed table: t [s], rss [MiB] (tree), main rss [MiB], fds (tree), processes."""
    return f"{s.t:7.1f} {s.rss_mib:10.1f} {s.main_rss_mib:9.1f} {s.fds:5d} {s.procs:5d}"


def assert_steady(samples: list[Sample], duration: float, first_validation_s: float) -> None:
    """Resident memory, processes and open files after warm-up stay at their end-of-warm-up values."""
    warmup_s = max(WARMUP_FRACTION * duration, first_validation_s)
    warm = [s for s in samples if s.t >= warmup_s]
    assert len(warm) >= 3 * WINDOW, f"too few samples after warm-up ({warmup_s:.0f} s): {len(warm)}"
    procs = warm[0].procs
    assert max(s.procs for s in warm) <= procs, "processes were added after warm-up"
    running = [s for s in warm if s.procs == procs]  # not the shut-down of the loader workers at the end
    first, last = running[:WINDOW], running[-WINDOW:]
    rss_warm, fds_warm = median(s.rss_mib for s in first), median(s.fds for s in first)
    rss_end, fds_end = median(s.rss_mib for s in last), median(s.fds for s in last)
    peak = max(warm, key=lambda s: s.rss_mib)
    print(
        f"warm-up end t={first[0].t:.0f} s (20%: {WARMUP_FRACTION * duration:.0f} s, first validation: "
        f"{first_validation_s:.0f} s): rss {rss_warm:.1f} MiB, {fds_warm:.0f} fds, {procs} procs; "
        f"max after: {peak.rss_mib:.1f} MiB at t={peak.t:.0f} s; "
        f"end t={last[-1].t:.0f} s: rss {rss_end:.1f} MiB, {fds_end:.0f} fds"
    )
    assert peak.rss_mib <= (1 + RSS_TOLERANCE) * rss_warm, (
        f"resident memory grew after warm-up: {rss_warm:.1f} -> {peak.rss_mib:.1f} MiB"
    )
    assert fds_end <= fds_warm + FD_SLACK, f"open files grew: {fds_warm} -> {fds_end}"


def test_conmim_quickstart_soak_memory_and_open_files_stay_flat(tmp_path: Path) -> None:
    csv_logger = (
        '[{"class_path": "lightning.pytorch.loggers.CSVLogger",'
        ' "init_args": {"save_dir": "runs/quickstart/conmim", "name": "csv"}}]'
    )
    cmd = [
        sys.executable, "-m", "lightning_mim", "fit", "--config", str(ROOT / "configs/quickstart/conmim.yaml"),
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1", "--trainer.logger", csv_logger,
        "--trainer.enable_progress_bar", "false", "--data.batch_size", "32",
    ]  # fmt: skip
    log_path = tmp_path / "soak.log"
    samples: list[Sample] = []
    first_validation_s: float | None = None  # when the first validation after step 0 had ended
    print(f"\n{'t [s]':>7} {'rss [MiB]':>10} {'main rss':>9} {'fds':>5} {'procs':>5}")
    start = time.monotonic()
    with log_path.open("w") as log:  # a file, not a pipe: an unread pipe would fill and block the run
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines appear when they happen
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > TIMEOUT_S:
                    pytest.fail(f"no end after {TIMEOUT_S} s; log tail:\n{log_path.read_text()[-3000:]}")
                current = sample(proc.pid, time.monotonic() - start)
                if proc.poll() is None:  # keep only samples of a live run, not of its exit
                    samples.append(current)
                    print(row(current), flush=True)  # live with `pytest -s`; on failure in the captured output
                if first_validation_s is None and re.search(r"OnlineKNN: step [1-9]", log_path.read_text()):
                    first_validation_s = current.t
                    print(f"first validation done by t={current.t:.1f} s", flush=True)
                time.sleep(INTERVAL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    duration = time.monotonic() - start
    output = log_path.read_text()
    # 143: stopped by a SIGTERM from outside (lightning-mim exits 128 + 15 after its preemption checkpoint)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-4000:]}"
    assert f"`Trainer.fit` stopped: `max_steps={STEPS}` reached" in output, output[-4000:]
    print(f"soak: {STEPS} steps in {duration:.0f} s, {len(samples)} samples every {INTERVAL_S:.0f} s")

    assert first_validation_s is not None, "no validation reported"
    assert_steady(samples, duration, first_validation_s)

    checkpoint = tmp_path / "runs/quickstart/conmim/checkpoints/last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == STEPS
