"""``moepp-bench`` on tiny shapes: each benchmark runs, writes a well-formed record, and
MoE++ and vanilla see the same tokens; ``report`` turns the records into README tables."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moepp_megatron.bench import cli
from moepp_megatron.bench.distributions import ideal_speedup
from moepp_megatron.bench.paper import paper_speedup
from moepp_megatron.bench.records import RECORD_KEYS, SCHEMA_VERSION
from moepp_megatron.bench.report import BEGIN, END, RUNS_BEGIN, RUNS_END

TINY = ["--set", "model.hidden_size=32", "model.moe.ffn_hidden_size=64"]
TIMING = ["--device", "cpu", "--warmup", "0", "--repeats", "1"]
# The single_process fixture's rendezvous variables would make the child reuse its port.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _bench(*args: str, timeout: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    subprocess.run([sys.executable, "-m", "moepp_megatron.bench", *args], check=True, timeout=timeout, env=env)


def run_bench(results_dir: Path, *args: str) -> dict:
    """Runs ``python -m moepp_megatron.bench ARGS``; returns the one record it wrote."""
    before = set(results_dir.glob("*.json"))
    _bench(*args, "--results-dir", str(results_dir), timeout=600)
    (path,) = set(results_dir.glob("*.json")) - before
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}_cpu_{args[0]}\.json", path.name), path.name
    record = json.loads(path.read_text())
    assert set(RECORD_KEYS) <= set(record)
    assert record["schema_version"] == SCHEMA_VERSION and record["benchmark"] == args[0]
    assert record["device"]["type"] == "cpu"
    assert record["versions"]["torch"] and record["versions"]["megatron_core"]
    assert "commit" in record["git"] and record["config"]["resolved_models"]
    return record


def test_all_runs_every_benchmark_then_the_report(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "main", calls.append)
    argv = ["all", "--device", "cpu", "--warmup", "0", "--results-dir", str(tmp_path), "--set", "a.b=1"]
    cli.run_all(cli._parser().parse_args(argv))
    assert [call[0] for call in calls] == ["layer", "overhead", "train", "costs", "comm", "report"]
    timed = ["--device", "cpu", "--threads", "1", "--warmup=0", "--results-dir", str(tmp_path), "--set", "a.b=1"]
    assert calls[0] == ["layer", *timed] and calls[2] == ["train", *timed] and calls[3] == ["costs", *timed]
    assert calls[4] == ["comm", "--results-dir", str(tmp_path), "--set", "a.b=1"]
    assert calls[5][:3] == ["report", "--results-dir", str(tmp_path)]


def _assert_timing(summary: dict) -> None:
    assert summary["median_ms"] > 0 and len(summary["samples_ms"]) == 1


def test_layer_benchmark_record_and_report(tmp_path):
    record = run_bench(tmp_path, "layer", "--models", "0.6B", "--taus", "0.5", "--tokens", "48", *TIMING, *TINY)
    init, balanced = record["results"]
    assert (init["distribution"], balanced["distribution"], balanced["tau"]) == ("router_init", "balanced", 0.5)
    for row in record["results"]:
        assert row["moepp"]["tokens"] == row["vanilla"]["tokens"] == 48
        for method in ("moepp", "vanilla"):
            _assert_timing(row[method]["forward"])
            _assert_timing(row[method]["forward_backward"])
    # Balanced at tau 0.5 with 8 FFN + 4 ZC experts: FFN share 4 / 8 of the slots.
    assert balanced["moepp"]["ffn_fraction"] == 0.5 and balanced["vanilla"]["ffn_fraction"] == 1.0
    assert balanced["ideal_speedup"] == balanced["ideal_speedup_formula"] == ideal_speedup(8, 4, 0.5) == 2.0
    assert balanced["paper_speedup"] == pytest.approx(paper_speedup("0.6B", 0.5)) == pytest.approx(535.3 / 387.3)
    assert init["paper_speedup"] is None

    text = _report(tmp_path)
    assert "**layer** on CPU" in text
    assert "| 0.6B (8+4E) | 0.50 |" in text and "1.38x" in text


def _report(results_dir: Path) -> str:
    """README's generated parts from the records in ``results_dir``."""
    readme = results_dir / "README.md"
    readme.write_text(f"# t\n\n## Reproducing the paper\n\n{RUNS_BEGIN}\nold\n{RUNS_END}\n\n"
                      f"## Performance\n\n{BEGIN}\nold\n{END}\n")
    _bench("report", "--readme", str(readme), "--results-dir", str(results_dir), timeout=120)
    text = readme.read_text()
    assert "old" not in text
    return text


@pytest.mark.slow
def test_costs_benchmark_record_and_report(tmp_path):
    from moepp_megatron.config import load_config
    from moepp_megatron.model.size import parameter_counts

    shape = [*TINY, "model.num_layers=2", "model.num_attention_heads=4", "model.head_dim=8"]
    record = run_bench(tmp_path, "costs", "--runs", "moepp-0.6b-tau0.75,moepp-7b-s2", "--micro-batch", "1",
                       "--seq-length", "32", *TIMING, *shape)
    small, large = record["results"]
    assert (small["run"], large["run"]) == ("moepp-0.6b-tau0.75", "moepp-7b-s2")
    for row, preset in ((small, "moepp-0.6b-8+4e"), (large, "moepp-7b-16+4e")):
        assert (row["micro_batch"], row["seq_length"]) == (1, 32)
        for depth in ("one_layer", "two_layers"):
            _assert_timing(row[depth]["forward_backward"])
            _assert_timing(row[depth]["optimizer"])
        # The two models differ by one decoder layer, as the config's arithmetic says.
        model = load_config([preset], [*shape[1:], "model.seq_length=32"]).model
        per_layer = parameter_counts(model).total - parameter_counts(dataclasses.replace(model, num_layers=1)).total
        assert row["two_layers"]["parameters"] - row["one_layer"]["parameters"] == per_layer
        assert row["layer_ms"] + row["ends_ms"] == pytest.approx(row["one_layer"]["forward_backward"]["median_ms"])
    text = _report(tmp_path)
    assert "**costs** on CPU" in text and "| moepp-7b-s2 | 1 x 32 |" in text
    # A CPU measurement does not scale to an A100: the paper runs stay unmeasured.
    assert "| MoE++ 0.6B (8+4)E | `moepp-0.6b-tau0.75` | PP 1 x DP 32, EP 8 | 16 x 4 |" in text
    assert "not measured" in text


def test_overhead_benchmark_record(tmp_path):
    record = run_bench(tmp_path, "overhead", "--models", "0.6B", "--tokens", "32", "--compile", "off", *TIMING, *TINY)
    vanilla, moepp = record["results"]
    assert (vanilla["method"], moepp["method"], moepp["compile_routing"]) == ("vanilla", "moepp", False)
    assert "zc_experts" in moepp and "zc_experts" not in vanilla
    assert all(row["share"]["forward"] > 0 for row in record["results"])


@pytest.mark.slow
def test_comm_benchmark_ratio_is_the_ffn_share(tmp_path):
    record = run_bench(tmp_path, "comm", "--ep", "2", "--taus", "0.25", "--tokens", "48", *TINY)
    vanilla, moepp = record["results"]
    assert vanilla["ratio_to_vanilla"] == 1.0 and vanilla["bytes_per_step_per_rank"] > 0
    assert moepp["ratio_to_vanilla"] == pytest.approx(moepp["ffn_share"], rel=1e-12)
    assert moepp["ffn_share"] == pytest.approx(moepp["ffn_share_formula"], abs=1 / 96)


@pytest.mark.slow
def test_train_benchmark_record(tmp_path):
    record = run_bench(
        tmp_path, "train", *TIMING, "--seq-length", "16", *TINY,
        "model.num_layers=2", "model.vocab_size=128", "model.num_attention_heads=4", "model.head_dim=8",
    )
    moepp, vanilla = record["results"]
    assert (moepp["method"], vanilla["method"]) == ("moepp", "vanilla")
    assert moepp["tokens_per_step"] == vanilla["tokens_per_step"] == 16
    for row in record["results"]:
        assert row["tokens_per_s"] > 0 and row["peak_memory"]["kind"] == "cpu_peak_rss"
        assert row["peak_memory"]["bytes"] > 0 and row["mfu"] is None
        assert row["num_expert_layers"] == 2 and 0 < row["expert_layer_share"]
    # Balanced routing (the default) in every layer: vanilla uses k = 2 FFN experts per token,
    # MoE++ at tau 0.75 with 8 FFN + 4 ZC experts 2 * 6 / 10 of them (16 tokens: 32 slots,
    # each FFN expert is owed 2.4 of them, each ZC expert 3.2; largest-remainder rounding
    # gives the FFN experts 20).
    assert vanilla["ffn_experts_per_token"] == 2.0
    assert moepp["ffn_experts_per_token"] == 20 / 16
    target = moepp["end_to_end"]
    share, gain = target["vanilla_expert_layer_share"], target["paper_expert_forward_speedup"]
    assert share == vanilla["expert_layer_share"] and gain == pytest.approx(535.3 / 427.6)
    assert target["target_speedup"] == pytest.approx(1 / (1 - share + share / gain))
    assert target["measured_speedup"] == vanilla["step"]["median_ms"] / moepp["step"]["median_ms"]


def test_startup_mistakes_fail_fast_with_one_line(tmp_path):
    """The cases ``moepp-bench startup`` times are real mistakes: each exits 1 with one
    error line (what is timed is the time to that message)."""
    from moepp_megatron.bench.startup import mistakes, time_command

    for case, argv in mistakes(tmp_path).items():
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, (case, out.stderr)
    assert time_command(["no-such-command-here"], 1) == {"argv": ["no-such-command-here"], "missing": True}
