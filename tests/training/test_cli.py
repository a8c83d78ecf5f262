"""moepp-train as a user meets it, through real processes: --dry-run prints the plan and
starts nothing; a config mistake is one line and exit 1, once even with two ranks;
--print-config is the resolved config; no known warning and no traceback on the way."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from moepp_megatron.config import load_config
from tests.bench.test_cli import LAUNCH_VARIABLES
from tests.training.runs import REPO, Job

pytestmark = pytest.mark.slow


def moepp_train(*args: str, env=None) -> subprocess.CompletedProcess:
    # Not the launch variables the session-wide single_process fixture may have set in this
    # process (WORLD_SIZE=1 would decide the world size of a --dry-run).
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return subprocess.run([sys.executable, "-m", "moepp_megatron.training.train", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**clean, **(env or {})})


def test_dry_run_prints_the_plan_and_starts_nothing(run_config, tmp_path):
    out = moepp_train("--dry-run", "--config", run_config())
    assert out.returncode == 0, out.stderr
    for expected in ("layout     2 processes = TP 1 x PP 1 x DP 2; EP 2", "parameters ", "active per token",
                     "GFLOP per token", "per rank", "50.0%", "epochs", f"run dir    {tmp_path / 'run'} (new run)"):
        assert expected in out.stdout
    assert "Warning" not in out.stderr and "warn" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
    # No GPU measured this model's per-layer costs (bench/results has CPU records only).
    assert "step time  not estimated: no per-layer costs measured on a GPU for this model at micro-batch 4 x 32" \
        in out.stdout


def test_dry_run_step_time_from_per_layer_costs_measured_on_a_gpu(run_config, tmp_path):
    from moepp_megatron.training.plan import plan_run

    model = plan_run(load_config(run_config()), 2).config.model  # the vocabulary padded as the run has it
    row = {"run": "tiny", "micro_batch": 4, "model": dataclasses.asdict(model), "layer_ms": 1.0, "ends_ms": 2.0,
           "optimizer_ns_per_param": 0.5}
    results = tmp_path / "results"
    results.mkdir()
    (results / "20261201-000000_nvidia-h200_costs.json").write_text(json.dumps(
        {"benchmark": "costs", "device": {"type": "cuda", "name": "NVIDIA H200"}, "results": [row]}))
    out = moepp_train("--dry-run", "--config", run_config(), "--layer-costs", results, "--gpu", "H100")
    assert out.returncode == 0, out.stderr
    # 16 sequences per step over 2 data-parallel ranks: two micro-batches of 4 each; 4 layers.
    # H200 and H100 have the same peak: compute = 2 x (4 x 1 ms + 2 ms).
    assert "step time  ~0.01 s on 2 x H100: compute 0.012 + pipeline bubble 0.000 + all-to-all 0.000" in out.stdout, \
        out.stdout
    assert ("from per-layer costs measured on H200 (20261201-000000_nvidia-h200_costs.json, run tiny)"
            in out.stdout), out.stdout


def test_step_time_is_for_gpus_with_data_sheets(run_config):
    from moepp_megatron.training.plan import ConfigError
    from moepp_megatron.training.train import _target_gpu

    assert _target_gpu("NVIDIA A100-SXM4-80GB").name == "A100"
    with pytest.raises(ConfigError, match="GPU 'TPU v5': no data sheet .* --gpu takes one of H100 PCIe, H200"):
        _target_gpu("TPU v5")
    # One line, before the plan is printed; and not accepted where nothing would read it.
    out = moepp_train("--dry-run", "--config", run_config(), "--gpu", "TPU v5")
    assert out.returncode == 1 and out.stdout == "" and out.stderr.startswith("error: GPU 'TPU v5': no data sheet")
    out = moepp_train("--check", "--config", run_config(), "--gpu", "A100")
    assert out.returncode == 2 and "--gpu and --layer-costs go with --dry-run" in out.stderr


def test_a_config_mistake_is_one_line_before_anything_starts(run_config):
    started = time.monotonic()
    out = moepp_train("--check", "--world-size", 2, "--config", run_config(), "optim.warmup_iters=8")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: optim.warmup_iters=8 must be smaller than the decay length (training iterations = 8)"
    ]
    print(f"error after {time.monotonic() - started:.1f} s")


def test_two_ranks_report_a_mistake_once(run_config, tmp_path):
    job = Job.ranks(run_config(), ["training.micro_batch_size=3"], tmp_path / "logs")
    assert job.wait(timeout=300) == [1, 1]
    output = job.output()
    assert output.count("error: ") == 1 and "micro_batch_size (3)" in output, output
    assert "Traceback" not in output


def test_print_config_is_the_resolved_config(run_config, tmp_path):
    out = moepp_train("--print-config", "--config", run_config(), "optim.lr=3e-4")
    assert out.returncode == 0, out.stderr
    (tmp_path / "resolved.yaml").write_text(out.stdout)
    resolved = load_config(tmp_path / "resolved.yaml")
    assert resolved.optim.lr == 3e-4 and resolved.data.cache_dir == str(tmp_path / "run" / "data_cache")
    assert resolved == load_config(run_config(), ["optim.lr=3e-4", f"data.cache_dir={tmp_path / 'run' / 'data_cache'}"])
