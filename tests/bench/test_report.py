"""README's paper-run table: memory per GPU from the config, and the step time of every run
whose per-layer costs a GPU measured (a record as ``moepp-bench costs`` writes it)."""

from __future__ import annotations

import dataclasses
import json

from moepp_megatron.bench.presets import PAPER_RUNS, PAPER_WORLD_SIZE
from moepp_megatron.bench.report import render_paper_runs
from moepp_megatron.config import load_config
from moepp_megatron.model import size
from moepp_megatron.model.hardware import find_gpu
from moepp_megatron.training.plan import batch_geometry, estimate_run_step


def test_paper_runs_table_from_gpu_costs(tmp_path):
    measured = {"moepp-0.6b-tau0.75": 10.0, "moepp-7b-s2": 30.0}
    rows = []
    for name, layer_ms in measured.items():
        config = load_config(PAPER_RUNS[name].configs, PAPER_RUNS[name].overrides)
        rows.append({"run": name, "micro_batch": config.training.micro_batch_size,
                     "model": dataclasses.asdict(config.model), "layer_ms": layer_ms, "ends_ms": 20.0,
                     "optimizer_ns_per_param": 0.1})
    record = {"benchmark": "costs", "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "results": rows}
    (tmp_path / "20261201-000000_nvidia-h100-80gb-hbm3_costs.json").write_text(json.dumps(record))

    table = render_paper_runs(tmp_path)
    assert "`20261201-000000_nvidia-h100-80gb-hbm3_costs.json`" in table
    lines = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ") and "`" in line}
    assert set(lines) == {f"`{name}`" for name in PAPER_RUNS}
    for name, run in PAPER_RUNS.items():
        config = load_config(run.configs, run.overrides)
        p = config.parallel
        g = batch_geometry(config, PAPER_WORLD_SIZE // p.pipeline)
        memory = size.training_memory(config.model, p, world_size=PAPER_WORLD_SIZE, micro_batch=g.micro_batch_size,
                                      num_microbatches=g.num_microbatches, bf16=True, distributed_optimizer=True)
        cells = lines[f"`{name}`"].strip("| ").split(" | ")
        assert cells[4] == size.format_bytes(memory.total)
        if name in measured:
            step, _ = estimate_run_step(config, PAPER_WORLD_SIZE, g, find_gpu("A100"), [record | {"path": "r"}])
            assert cells[5] == f"{step.total_s:.2f}"
            assert cells[7] == f"{step.total_s * g.train_iters / 86400:.1f}"
        else:
            assert cells[5:] == ["not measured"] * 3
