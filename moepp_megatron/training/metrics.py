"""Where training metrics go: stdout, ``metrics.jsonl`` in the run directory, TensorBoard,
and Weights & Biases (offline by default). Only the logging rank writes. :func:`read_metrics`
reads ``metrics.jsonl`` back, in today's layout also when an older version wrote it.

Per-layer metrics are keyed ``layer_1`` ... ``layer_L`` (:func:`layer_key`) in every record
and tag: megatron's ``layer_number``, 1-based over the whole model, the number the MoE
layers and megatron's aux-loss tracker know themselves by. Layer ``layer_n`` holds the
weights ``decoder.layers.{n-1}`` (HF: ``model.layers.{n-1}``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from moepp_megatron.config.schema import LoggingConfig

METRICS_FILE = "metrics.jsonl"
AUX_LOSSES = ("load_balancing_loss", "z_loss")


def layer_key(layer_number: int) -> str:
    return f"layer_{layer_number}"


class MetricsLogger:
    """Prints from construction on; writes metrics once :meth:`open` has been given the
    iteration the run starts from."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_config: dict, enabled: bool) -> None:
        self.cfg, self.run_dir, self.run_config = cfg, run_dir, run_config
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.wandb_run = None

    def open(self, start_iteration: int) -> None:
        """Start writing. A resumed run first drops the records after its checkpoint (the
        iterations a crash rolled back), so every iteration appears once: its last run's."""
        if not self.enabled:
            return
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        _drop_records_after(path, start_iteration)
        self.jsonl = open(path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of the rolled-back iterations from readers.
            self.tensorboard = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=start_iteration + 1
            )
        if cfg.wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb needs the wandb package: pip install wandb") from e
            self.wandb_run = wandb.init(
                project=cfg.wandb_project, dir=str(self.run_dir), mode=cfg.wandb_mode,
                config=self.run_config, name=self.run_dir.name, resume="allow",
            )

    def log(self, iteration: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if self.jsonl is None:
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


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir``'s metrics.jsonl, in today's layout."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a moepp-train run directory, or nothing logged yet")
    # Every record ends with a newline: text after the last one is a record a live run is
    # writing (or a crash cut).
    lines = path.read_text().split("\n")[:-1]
    return [_current_layout(json.loads(line)) for line in lines]


def _current_layout(record: dict) -> dict:
    """Records written before per-layer metrics were keyed by layer (aux losses were lists
    indexed from 0) and before routing was split into picked / kept, converted."""
    record = dict(record)
    for name in AUX_LOSSES:
        if isinstance(record.get(name), list):
            record[name] = {layer_key(index + 1): value for index, value in enumerate(record[name])}
    if "routing" in record:
        record["routing"] = {layer: current_routing(stats) for layer, stats in record["routing"].items()}
    return record


def current_routing(stats: dict) -> dict:
    """A layer's routing statistics in today's layout: ``picked`` and ``kept`` with the same
    fields, and ``dropped_fraction``. Older layouts (the kept statistics unprefixed, the
    picked ones prefixed ``picked_``; no per-expert loads, no picked load imbalance), as in
    old metrics.jsonl files and study records, are converted."""
    if "kept" in stats:
        return stats
    return {
        "picked": {"ffn_experts_per_token": stats["picked_ffn_experts_per_token"],
                   "zc_share": stats["picked_zc_share"]},
        "kept": {"ffn_experts_per_token": stats["ffn_experts_per_token"], "zc_share": stats["zc_share"],
                 "ffn_load_imbalance": stats["ffn_load_imbalance"]},
        "dropped_fraction": stats["dropped_fraction"],
    }


def _drop_records_after(path: Path, iteration: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _iteration_of(line) <= iteration]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _iteration_of(line: str) -> float:
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut by a crash: dropped with the rolled-back ones


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
