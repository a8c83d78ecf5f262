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
    first = progress.interval(20, flops_per_token=1e9)  # 10 steps in 10 s
    assert first["elapsed_s"] == 10 and first["eta_s"] == pytest.approx(80)
    assert first["model_tflops_per_s"] == pytest.approx(1e9 * 1000 / 4 / 1e12)
    assert first["mfu"] == pytest.approx(0.25) and first["target_tokens"] == 100_000
    second = progress.interval(30, flops_per_token=1e9)  # the next 10 steps took 20 s
    assert second["elapsed_s"] == 30 and second["eta_s"] == pytest.approx(140)
    text = progress_text({**second, "consumed_tokens": 30_000})
    assert text == "30.00K/100.00K tokens | 0.125 TFLOP/s | MFU 12.5% | elapsed 30s | ETA 2m20s"


def test_no_mfu_without_a_known_peak():
    assert "mfu" not in Progress(0, 10, 100, processes=1).interval(1, flops_per_token=1.0)
