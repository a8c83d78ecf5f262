"""Running the trainer in test processes and reading what it wrote."""

from __future__ import annotations

import json
from pathlib import Path


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
