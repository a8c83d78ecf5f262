"""scripts/gpu_check.sh in its CPU dry run: every stage of the GPU check runs (the GPU tests
on CPU, the benchmarks at tiny shapes), writes its record, and the report puts the GPU
tests' outcomes into README; ``prepare`` asks pip for the pinned cp312 wheels."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moepp_megatron.bench import gpu_check
from tests.bench.test_cli import LAUNCH_VARIABLES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
# Minutes of real training on 2 cores: longer than the suite-wide 600 s when the machine is loaded.
@pytest.mark.timeout(1800)
def test_cpu_dry_run_runs_every_stage_and_keeps_its_records(tmp_path, monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    results, out = tmp_path / "results", tmp_path / "out"
    command = ["bash", str(REPO / "scripts/gpu_check.sh"), "--cpu-dry-run", "--results-dir", str(results),
               "--readme", str(readme), "--out", str(out)]
    check = subprocess.run(command, timeout=1500)

    (summary_path,) = results.glob("*_cpu_gpu-check.json")
    summary = json.loads(summary_path.read_text())
    assert [s["stage"] for s in summary["results"]] == [stage.name for stage in gpu_check.STAGES]
    failed = [s for s in summary["results"] if s["rc"] != 0 or s["timed_out"]]
    assert not failed, "\n\n".join(f"stage {s['stage']}: rc {s['rc']}, timed out {s['timed_out']}, "
                                    f"{s['seconds']} s\n{s['output_tail']}" for s in failed)
    assert check.returncode == 0
    for benchmark in ("gpu-tests", "costs", "layer", "overhead", "train"):
        (path,) = results.glob(f"*_cpu_{benchmark}.json")
        assert (out / path.name).read_bytes() == path.read_bytes()
    tests = json.loads(next(results.glob("*_gpu-tests.json")).read_text())["results"]
    outcomes = {t["test"].rsplit("::", 1)[-1]: t["outcome"] for t in tests}
    # On CPU only the CUDA-only checks skip; everything else ran.
    assert {name for name, o in outcomes.items() if o == "skipped"} == {
        "test_routing_and_zc_experts_do_not_sync", "test_compiled_routing_matches_eager"}
    assert set(outcomes.values()) == {"passed", "skipped"}
    assert "test_train_resume_exactly_and_export" in outcomes
    assert "**gpu-tests** on CPU" in readme.read_text() and (out / "README.md").exists()
    # At most 8 files come back from a device run.
    assert len(list(out.iterdir())) <= 8


def test_gpu_stages_fit_the_budget():
    """Stage limits on a GPU add up to the check's budget, which leaves a rerun inside 15 minutes."""
    assert sum(stage.limit_s for stage in gpu_check.STAGES) <= gpu_check.GPU_BUDGET_S <= 8 * 60


def test_prepare_downloads_the_pinned_cp312_wheels(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda command, check: calls.append(command))
    gpu_check.prepare(tmp_path)
    (command,) = calls
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "--no-deps" in command and "manylinux_2_28_x86_64" in command
    assert command[-len(gpu_check.WHEELS):] == list(gpu_check.WHEELS) == ["megatron-core==0.16.1"]


def test_run_without_cuda_says_what_to_do(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["run"])
    assert "--cpu-dry-run" in capsys.readouterr().err
