"""Writing run configs, running the trainer in test processes and reading what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.distributed import find_free_port

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def run_config_writer(tiny_data, directory: Path):
    """``write(name, **sections)`` writes ``<directory>/<name>.yaml``, a run config for the tiny
    CPU model with its run directory at ``<directory>/<name>``, and returns its path; keyword
    arguments update sections (e.g. ``training={"train_iters": 6}``)."""
    tokenizer, prefixes = tiny_data

    def write(name: str = "run", **sections) -> Path:
        config = {
            "base": str(CONFIGS / "tiny-cpu.yaml"),
            "run_dir": str(directory / name),
            "model": {"seq_length": 32},
            "data": {
                "tokenizer_model": str(tokenizer),
                "sources": [{"prefix": str(p), "weight": w} for p, w in zip(prefixes, (5, 3, 2))],
                "split": "90,10,0",
                "num_workers": 0,
            },
            "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 2},
            "training": {"train_iters": 8, "global_batch_tokens": 512, "micro_batch_size": 4,
                         "eval_interval": 4, "eval_iters": 1},
            "checkpoint": {"save_interval": 4},
            "logging": {"interval": 1, "tensorboard": False},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def train_rank(config_path: str, overrides: list[str]) -> int:
    """One rank of ``moepp-train`` (for tests.distributed.run_distributed)."""
    from moepp_megatron.training.train import main

    return main(["--config", config_path, *overrides])


def train_losses(run_dir: Path) -> dict[int, float]:
    """iteration -> training lm loss, from the run's metrics.jsonl."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "lm_loss" in record:
            losses[record["iteration"]] = record["lm_loss"]
    return losses


def metric_records(run_dir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl, parsed as strict JSON (NaN is not JSON)."""

    def reject(constant):
        raise ValueError(f"metrics.jsonl holds {constant}, which strict JSON readers reject")

    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=reject) for line in text.splitlines()]


def train_iterations(run_dir: Path) -> list[int]:
    """Iterations of the training records of metrics.jsonl, in the order written."""
    return [r["iteration"] for r in metric_records(run_dir) if "lm_loss" in r]


class Job:
    """A training job in real processes, each leading its own process group (itself and
    everything it starts): the ranks of ``moepp-train`` started directly, as torchrun starts
    them (:meth:`ranks`), or ``scripts/pretrain.sh`` (:meth:`script`). Logs go to ``logs/``."""

    def __init__(self, processes: list[subprocess.Popen], logs: Path) -> None:
        self.processes, self.logs = processes, logs

    @classmethod
    def ranks(cls, config: Path, overrides: list[str], logs: Path, world_size: int = 2, env=None) -> "Job":
        """``env``: variables to set (None: unset) over the launch environment."""
        logs.mkdir(parents=True, exist_ok=True)
        port = find_free_port()
        processes = []
        for rank in range(world_size):
            rank_env = dict(
                os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOEPP_CPU_MODE="1", OMP_NUM_THREADS="1",
            )
            for name, value in (env or {}).items():
                if value is None:
                    rank_env.pop(name, None)
                else:
                    rank_env[name] = value
            processes.append(cls._start(
                [sys.executable, "-m", "moepp_megatron.training.train", "--config", str(config), *overrides],
                rank_env, logs / f"rank{rank}.log",
            ))
        return cls(processes, logs)

    @classmethod
    def script(cls, config: Path, overrides: list[str], logs: Path, nproc: int = 2) -> "Job":
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, NPROC_PER_NODE=str(nproc), MASTER_PORT=str(find_free_port()),
                   MOEPP_CPU_MODE="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60")
        return cls([cls._start(["bash", str(REPO / "scripts/pretrain.sh"), str(config), *overrides],
                               env, logs / "pretrain.log")], logs)

    @staticmethod
    def _start(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        with open(log_path, "w") as log:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def signal(self, signum: int, group: bool = True) -> None:
        """``signum`` to every process group of the job (as Slurm signals a job step), or
        ``group=False``: to the processes started (a script or the ranks) alone."""
        for process in self.processes:
            try:
                (os.killpg if group else os.kill)(process.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.processes]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not exit within {timeout:.0f} s\n{self.tail()}")

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def tail(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                         for p in sorted(self.logs.glob("*.log")))

    def wait_for_iteration(self, run_dir: Path, iteration: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _logged(run_dir, iteration):
                return
            if any(p.poll() is not None for p in self.processes):
                pytest.fail(f"the job exited before iteration {iteration}\n{self.tail()}")
            time.sleep(0.1)
        pytest.fail(f"iteration {iteration} not logged within {timeout:.0f} s\n{self.tail()}")


def _logged(run_dir: Path, iteration: int) -> bool:
    try:
        return iteration in train_iterations(run_dir)
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return False
