"""moepp-study: the offline corpus is deterministic and held out by path; ``--quick`` runs
the main comparison end to end (real trainer processes on the quick corpus) and writes a
record in which every run saw the same tokens, the table, the plots and the README section."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from moepp_megatron.bench.records import RECORD_KEYS
from moepp_megatron.study import cli, report
from moepp_megatron.study.corpus import build_corpus, held_out

REPO = Path(__file__).resolve().parents[2]


def test_corpus_is_deterministic_and_holds_out_by_path(tmp_path):
    first = build_corpus("quick", tmp_path / "a").manifest
    second = build_corpus("quick", tmp_path / "b").manifest
    assert first == second
    assert first["sources"]["valid"]["documents"] > 0 and first["train_tokens"] >= 200_000
    # Held out by a hash of the path: the same answer whatever else is in the corpus.
    assert held_out("stdlib", "json/decoder.py", 24) == held_out("stdlib", "json/decoder.py", 24)
    assert sum(held_out("s", f"f{i}.py", 3) for i in range(10_000)) == pytest.approx(10_000 * 3 / 256, rel=0.15)
    # Reused when nothing changed (the tokenizer is not retrained).
    stamp = (tmp_path / "a" / "tokenizer.model").stat().st_mtime_ns
    build_corpus("quick", tmp_path / "a")
    assert (tmp_path / "a" / "tokenizer.model").stat().st_mtime_ns == stamp


@pytest.mark.slow
# Minutes of real training on 2 cores: longer than the suite-wide 600 s when the machine is loaded.
@pytest.mark.timeout(1800)
def test_quick_study_end_to_end(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    results, plots = tmp_path / "results", tmp_path / "plots"
    assert cli.main(["--quick", "--work-dir", str(tmp_path / "work"), "--results-dir", str(results),
                     "--readme", str(readme), "--plot-dir", str(plots)]) == 0

    (path,) = results.glob("*_cpu_study-quick.json")
    record = json.loads(path.read_text())
    assert set(RECORD_KEYS) <= set(record)
    runs = record["results"]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        ("vanilla", 1), ("vanilla", 2), ("moepp-tau0.75", 1), ("moepp-tau0.75", 2)]
    # Every run read the same tokens in the same order, whatever its model seed.
    assert len({r["data_fingerprint"] for r in runs}) == 1
    for run in runs:
        assert run["tokens"] == 20 * 1024 and len(run["train_curve"]) == 10 and len(run["valid_curve"]) == 2
        assert all(math.isfinite(v) for v in (run["final_valid_loss"], run["final_valid_loss_dropless"]))
        assert run["step_cpu_time_s"] > 0 and 0 <= run["dropped_fraction"] < 1
        layers = run["routing"]
        assert sorted(layers) == ["layer_1", "layer_2"]
        if run["variant"] == "vanilla":
            assert run["expert_compute_ratio"] == run["step_time_ratio"] == 1.0
            assert all(layer[when]["zc_share"] == {} for layer in layers.values() for when in ("picked", "kept"))
            assert run["picked_ffn_experts_per_token"] == 2.0
        else:
            assert all(set(layer["kept"]["zc_share"]) == {"constant", "copy", "zero"} for layer in layers.values())
            assert run["picked_ffn_experts_per_token"] < 2.0
    # The two seeds differ (model seed), the data does not.
    assert runs[0]["final_valid_loss"] != runs[1]["final_valid_loss"]

    text = readme.read_text()
    section = text.split(report.BEGIN)[1].split(report.END)[0]
    assert "**study-quick**" in section and "| moepp-tau0.75 | 2 |" in section and " ± " in section
    assert "the same tokens in the same order in every run" in section
    assert sorted(p.name for p in plots.iterdir()) == [
        "study-quick_loss_vs_compute.png", "study-quick_routing.png", "study-quick_valid_loss.png"]
