"""The progress numbers of the training log, from known times and sizes."""

from __future__ import annotations

import pytest

from moepp_megatron.training import progress as progress_module
from moepp_megatron.training.progress import Progress, format_duration, progress_text


def test_format_duration():
    assert [format_duration(s) for s in (5, 65, 3600 + 120, 59.6)] == ["5s", "1m05s", "1h02m", "1m00s"]


def test_interval_gives_eta_throughput_and_mfu(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    # Resumed at iteration 10 of 100; 1000 tokens per step on 4 processes of 1 TFLOP/s peak.
    progress = Progress(10, 100, 1000, processes=4, peak_flops=1e12)
    for _ in range(10):
        progress.step_done(0.5)  # 10 steps of 0.5 s in 10 s of wall time (validation, saving)
    first = progress.interval(20, flops_per_token=1e9)
    assert first["elapsed_s"] == 10 and first["eta_s"] == pytest.approx(80)  # 80 iterations at 1 s
    assert first["tokens_per_s"] == pytest.approx(2000)  # the steps' own time
    assert first["model_tflops_per_s"] == pytest.approx(1e9 * 2000 / 4 / 1e12)
    assert first["mfu"] == pytest.approx(0.5) and first["target_tokens"] == 100_000
    for _ in range(10):
        progress.step_done(1.0)  # the next 10 steps: 1 s each, 20 s of wall time
    second = progress.interval(30, flops_per_token=1e9)
    assert second["elapsed_s"] == 30 and second["eta_s"] == pytest.approx(140)
    assert second["tokens_per_s"] == pytest.approx(1000)
    text = progress_text({**second, "consumed_tokens": 30_000})
    assert text == "30.00K/100.00K tokens | 0.25 TFLOP/s | MFU 25.0% | elapsed 30s | ETA 2m20s"


def test_no_mfu_without_a_known_peak():
    progress = Progress(0, 10, 100, processes=1)
    progress.step_done(1.0)
    assert "mfu" not in progress.interval(1, flops_per_token=1.0)
