"""Where training metrics go: stdout, ``metrics.jsonl`` in the run directory, TensorBoard,
and Weights & Biases (offline by default). Only the logging rank writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moepp_megatron.config.schema import LoggingConfig


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_config: dict, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb needs the wandb package: pip install wandb") from e
            self.wandb_run = wandb.init(
                project=cfg.wandb_project, dir=str(run_dir), mode=cfg.wandb_mode,
                config=run_config, name=run_dir.name, resume="allow",
            )

    def log(self, iteration: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, **metrics} if prefix == "train" else {
            "iteration": iteration, prefix: metrics
        }
        self.jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self.jsonl.flush()
        flat = dict(_flatten(metrics, prefix))
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, iteration)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(flat, step=iteration)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _json_safe(value):
    """Non-finite numbers become null: NaN / Infinity are not JSON (a skipped step's loss)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flatten(value, prefix):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}/{index}")
    elif isinstance(value, (int, float)) and math.isfinite(value):
        yield prefix, value
