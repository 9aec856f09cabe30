"""Multi-node launches: 2 "nodes" x 1 process under torchrun equals 1 node x 2 processes; the SLURM and
torchrun examples agree with the recipe they launch.

The two-node run is the torchrun command of ``examples/torchrun/multinode.sh`` on one machine: two torchrun
agents, one per "node", meet at a c10d rendezvous on localhost and each starts one CPU process (gloo).
Lightning must detect ``TorchElasticEnvironment`` and see a world of 2 on 2 nodes. The reference is the same
quickstart with ``--trainer.devices 2 --trainer.num_nodes 1``, whose second process Lightning launches itself.
Both runs have global ranks 0 and 1, the same seed and the same data shards, so their checkpoints must agree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy
from typing_extensions import override

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "examples" / "slurm" / "conmim_vitb.sbatch"
TORCHRUN = ROOT / "examples" / "torchrun" / "multinode.sh"
STEPS = 3

# The quickstart, shortened: 3 steps of 8 images per process, validation (and so the checkpoint) at step 3.
QUICKSTART = [
    "fit", "--config", str(ROOT / "configs" / "quickstart" / "conmim.yaml"),
    "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
    "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
    "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.default_root_dir", "run",
    "--data.train_size", "64", "--data.val_size", "16", "--data.batch_size", "8", "--data.num_workers", "0",
    "--trainer.callbacks+=tests.test_multinode.RankReport",
]  # fmt: skip


class RankReport(Callback):
    """Writes ``rank<global rank>.json`` to the working directory: what Lightning made of the launch."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        assert isinstance(trainer.strategy, ParallelStrategy)  # DDP
        environment = trainer.strategy.cluster_environment
        report = {
            "environment": type(environment).__name__,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
        }
        Path(f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def launch_env() -> dict[str, str]:
    """The caller's environment without a surrounding launcher's variables; this checkout importable."""
    launcher = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def run_concurrently(commands: list[tuple[list[str], Path]], timeout: float) -> list[str]:
    """Runs every (command, cwd) at once, each in its own session; their logs. Kills all on timeout."""
    procs, logs = [], []
    for cmd, cwd in commands:
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(cwd / "log.txt", "w")  # noqa: SIM115 - closed below, after the process ends
        procs.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=launch_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training processes it started
                proc.wait()
    finally:
        for log in logs:
            log.close()
    outputs = [(cwd / "log.txt").read_text() for _, cwd in commands]
    for (cmd, _), proc, output in zip(commands, procs, outputs, strict=True):
        assert proc.returncode == 0, f"{shlex.join(cmd)}\nexited with {proc.returncode}:\n{output[-4000:]}"
    return outputs


def reports(folder: Path) -> dict[int, dict[str, object]]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.rglob("rank*.json")}


def only_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The weights and AdamW moments in the one ``last.ckpt`` under ``folder``."""
    found = sorted(folder.rglob("last.ckpt"))  # rank 0 writes it, in its working directory
    assert len(found) == 1, [str(p.relative_to(folder)) for p in folder.rglob("*.ckpt")]
    ckpt = torch.load(found[0], weights_only=True)
    assert ckpt["global_step"] == STEPS
    (optimizer,) = ckpt["optimizer_states"]
    moments = {f"optimizer.{i}.{k}": v for i, state in optimizer["state"].items() for k, v in state.items()}
    return {**ckpt["state_dict"], **moments}


def test_two_nodes_under_torchrun_equal_one_node_with_two_processes(tmp_path: Path) -> None:
    port = free_port()
    nodes = [
        [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "multinode-test",
            "-m", "lightning_mim", *QUICKSTART, "--trainer.num_nodes", "2", "--trainer.devices", "1",
        ]
        for _ in range(2)
    ]  # fmt: skip
    # Each "node" has its own working directory, as on machines without a shared file system.
    logs = run_concurrently([(cmd, tmp_path / "two_nodes" / f"node{i}") for i, cmd in enumerate(nodes)], timeout=150)
    both = "\n".join(logs)
    assert f"`Trainer.fit` stopped: `max_steps={STEPS}` reached" in both, both[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in both
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in both
    seen = reports(tmp_path / "two_nodes")
    assert sorted(seen) == [0, 1], seen
    for report in seen.values():
        assert report["environment"] == "TorchElasticEnvironment", report
        assert (report["world_size"], report["num_nodes"], report["local_rank"]) == (2, 2, 0), report
    assert {report["node_rank"] for report in seen.values()} == {0, 1}  # one process on each node
    for node in (0, 1):  # the c10d rendezvous numbers the nodes (not --node-rank); each hosts one rank
        assert len(reports(tmp_path / "two_nodes" / f"node{node}")) == 1

    # Lightning starts the second process itself, re-running this command line.
    one_node = [sys.executable, "-m", "lightning_mim", *QUICKSTART, "--trainer.num_nodes", "1"]
    one_node += ["--trainer.devices", "2"]
    (log,) = run_concurrently([(one_node, tmp_path / "one_node")], timeout=150)
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    seen_one = reports(tmp_path / "one_node")
    assert sorted(seen_one) == [0, 1] and all(r["environment"] == "LightningEnvironment" for r in seen_one.values())

    multi, single = only_checkpoint(tmp_path / "two_nodes"), only_checkpoint(tmp_path / "one_node")
    assert multi.keys() == single.keys() and any(k.startswith("optimizer.") for k in multi)
    different = [k for k in multi if not torch.allclose(multi[k].float(), single[k].float(), rtol=0, atol=1e-6)]
    assert not different, different[:10]


def sbatch_directives(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines (before the first command, as sbatch reads them) as {key: value}."""
    directives: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            for option in line.split()[1:]:
                key, _, value = option.removeprefix("--").partition("=")
                directives[key] = value
    return directives


def launched_args(text: str, launcher: str) -> list[str]:
    """The arguments after ``lightning-mim`` / ``-m lightning_mim`` on the ``launcher`` command line."""
    lines = re.sub(r"\\\n", " ", text).splitlines()  # continued lines joined
    words = shlex.split(next(line for line in lines if line.lstrip().startswith(launcher)), comments=True)
    name = "lightning-mim" if "lightning-mim" in words else "lightning_mim"
    return words[words.index(name) + 1 :]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_sbatch_example_matches_its_slurm_allocation_and_recipe() -> None:
    text = SBATCH.read_text()
    directives = sbatch_directives(text)
    args = launched_args(text, "srun")
    assert args[0] == "fit" and option(args, "--ckpt_path") == "last"  # a requeued job resumes
    assert "--data.root" in args
    assert option(args, "--trainer.num_nodes") == directives["nodes"]
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]  # one task per GPU, as Lightning requires
    assert directives["signal"].startswith("USR1@") and "requeue" in directives
    config = yaml.safe_load((ROOT / option(args, "--config")).read_text())
    assert config["trainer"]["devices"] in ("auto", int(directives["ntasks-per-node"]))
    assert config["trainer"]["strategy"] == "ddp"
    from lightning_mim.cli import config_bases

    bases = [yaml.safe_load(base.read_text()) for base in config_bases(ROOT / option(args, "--config"))]
    appended = [c for base in bases for c in base["trainer"]["callbacks+"]]  # the recipe's shared callbacks
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"] + appended]
    assert "lightning_mim.callbacks.Preemption" in callbacks  # SIGUSR1 / SIGTERM: last.ckpt, requeue
    assert any(c.get("init_args", {}).get("save_last") for c in config["trainer"]["callbacks"])  # `last` finds it
    # Global batch: nodes x GPUs x per-GPU batch = the recipe's 2048.
    total = int(directives["nodes"]) * int(directives["ntasks-per-node"]) * config["data"]["init_args"]["batch_size"]
    assert total == 2048
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_torchrun_example_launches_the_recipe_with_a_rendezvous() -> None:
    text = TORCHRUN.read_text()
    assert text.startswith("#!")
    args = launched_args(text, "exec torchrun")
    config = ROOT / option(args, "--config")
    assert config.is_file() and option(args, "--ckpt_path") == "last"
    joined = re.sub(r"\\\n", " ", text)
    assert "--rdzv-backend c10d" in joined and "--rdzv-endpoint" in joined
    assert '--trainer.num_nodes "$NNODES"' in joined and '--nnodes "$NNODES"' in joined
    result = subprocess.run(["bash", "-n", str(TORCHRUN)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
