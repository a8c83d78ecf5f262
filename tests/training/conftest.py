"""A tiny blended corpus and run configs for trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.fixtures import tiny_blend

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return tiny_blend(tmp_path_factory.mktemp("blend"))


@pytest.fixture
def run_config(tiny_data, tmp_path):
    """``run_config(**sections)`` writes a run YAML for the tiny CPU model and returns its
    path; keyword arguments update sections (e.g. ``training={"train_iters": 6}``)."""
    tokenizer, prefixes = tiny_data

    def write(name: str = "run", **sections) -> Path:
        config = {
            "base": str(CONFIGS / "tiny-cpu.yaml"),
            "run_dir": str(tmp_path / name),
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
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
