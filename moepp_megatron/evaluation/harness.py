"""lm-evaluation-harness on a converted Hugging Face MoE++ model, with the paper's task table.

The model is loaded once (``trust_remote_code=True``) and evaluated per few-shot group, since
the harness takes one ``num_fewshot`` per call. Results become rows of
(task, shots, metric, value, stderr), written as markdown and JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

_INSTALL_HINT = "evaluation needs lm-evaluation-harness: pip install 'moepp-megatron[eval]'"

# docs/MOEPP_SPEC.md section 4 (the paper's evaluation): task -> number of few-shot examples.
PAPER_TASKS: dict[str, int] = {
    "arc_easy": 0,
    "lambada_openai": 0,
    "logiqa": 0,
    "piqa": 0,
    "sciq": 0,
    "winogrande": 0,
    "hellaswag": 10,
    "arc_challenge": 25,
    "mmlu": 5,
    "nq_open": 32,
    "boolq": 32,
}
PRESETS = {"paper": PAPER_TASKS}


@dataclass
class ResultRow:
    task: str
    shots: int
    metric: str
    value: float
    stderr: Optional[float]


def parse_tasks(specs: list[str]) -> dict[str, int]:
    """``["hellaswag:10", "piqa"]`` -> {"hellaswag": 10, "piqa": 0}."""
    tasks = {}
    for spec in specs:
        name, sep, shots = spec.partition(":")
        if not name or (sep and not shots.isdigit()):
            raise ValueError(f"task {spec!r}: expected NAME or NAME:SHOTS")
        tasks[name] = int(shots) if sep else 0
    return tasks


def evaluate(
    model_dir: str | Path,
    tasks: dict[str, int],
    *,
    include_path: Optional[str | Path] = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
    limit: Optional[float] = None,
) -> list[ResultRow]:
    """Run the harness for every task at its shot count; one row per (task, metric)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err

    lm = HFLM(
        pretrained=str(model_dir), trust_remote_code=True, device=device, dtype=dtype, batch_size=batch_size
    )
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    rows: list[ResultRow] = []
    for shots in sorted(set(tasks.values())):
        names = [name for name, n in tasks.items() if n == shots]
        output = simple_evaluate(
            model=lm, tasks=names, num_fewshot=shots, task_manager=manager, limit=limit,
            log_samples=False, bootstrap_iters=1000,
        )
        rows += _rows(output, names, shots)
    return rows


def _rows(output: dict, names: list[str], shots: int) -> list[ResultRow]:
    """The requested tasks' (or groups') metrics; subtasks of a group are left out."""
    rows = []
    for name in names:
        metrics = output.get("groups", {}).get(name) or output["results"][name]
        for key, value in metrics.items():
            metric, sep, filter_name = key.partition(",")
            # "metric,filter" keys only (not "alias", "sample_len", ...).
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            rows.append(ResultRow(name, shots, label, float(value), _number(stderr)))
    return rows


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def markdown_table(rows: list[ResultRow]) -> str:
    lines = ["| task | shots | metric | value | stderr |", "|---|---:|---|---:|---:|"]
    for r in rows:
        stderr = f"{r.stderr:.4f}" if r.stderr is not None else ""
        lines.append(f"| {r.task} | {r.shots} | {r.metric} | {r.value:.4f} | {stderr} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[ResultRow], output: str | Path, model_dir: str | Path) -> tuple[Path, Path]:
    """``results.md`` and ``results.json`` in ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    md, js = output / "results.md", output / "results.json"
    md.write_text(f"# lm-evaluation-harness: {model_dir}\n\n" + markdown_table(rows))
    js.write_text(json.dumps({"model": str(model_dir), "results": [asdict(r) for r in rows]}, indent=2) + "\n")
    return md, js
