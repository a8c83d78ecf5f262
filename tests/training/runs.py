"""Writing run configs, running the trainer in test processes and reading what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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
