"""moepp-plot: PNGs of a real run's metrics.jsonl (``logged_run``: 4 layers, ZC experts,
dropless validation) through the command line, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from moepp_megatron.training import plot

# Figure sizes in inches x 110 dpi: loss.png has lm loss and load-balance loss side by side;
# routing.png one row per layer and 4 columns (FFN, ZC, load max/mean, dropped).
LOSS_PNG, ROUTING_PNG = (1210, 440), (1760, 1144)


@pytest.mark.slow
def test_plots_of_a_real_run(logged_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(logged_run / "metrics.jsonl", run_dir)

    result = subprocess.run([sys.executable, "-m", "moepp_megatron.training.plot", str(run_dir)],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(run_dir / "plots/loss.png"), str(run_dir / "plots/routing.png")]
    for name, size in (("loss.png", LOSS_PNG), ("routing.png", ROUTING_PNG)):
        with Image.open(run_dir / "plots" / name) as image:
            assert (image.format, image.size) == ("PNG", size)
            image.load()  # decodes every row: a truncated file raises


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    _write_old_records(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as exit:
        plot.main([str(tmp_path)])
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        "moepp-plot: plotting needs matplotlib: pip install 'moepp-megatron[plot]'\n")
    assert not (tmp_path / "plots").exists()


def test_a_directory_without_metrics_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        plot.main([str(tmp_path)])
    assert exit.value.code == 2
    assert f"{tmp_path / 'metrics.jsonl'} does not exist" in capsys.readouterr().err


def test_help_imports_neither_torch_nor_matplotlib():
    code = ("import sys\nfrom moepp_megatron.training import plot\ntry:\n    plot.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'matplotlib'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: moepp-plot" in result.stdout and "pip install 'moepp-megatron[plot]'" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]"


def test_records_written_before_picked_and_kept_were_split(tmp_path):
    """An older run's metrics.jsonl still plots."""
    _write_old_records(tmp_path)
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "elsewhere")]) == 0
    with Image.open(tmp_path / "elsewhere/routing.png") as image:
        assert image.size == (1760, 572)  # 2 layers


def _write_old_records(run_dir):
    """Two steps of a 2-layer run as written before per-layer metrics were keyed by layer
    number and routing split into picked / kept (no picked load imbalance then)."""
    layer = {"ffn_experts_per_token": 1.15, "zc_share": {"zero": 0.06}, "picked_ffn_experts_per_token": 1.33,
             "picked_zc_share": {"zero": 0.07}, "ffn_load_imbalance": 1.14, "dropped_fraction": 0.09}
    records = [{"iteration": it, "lm_loss": 9.0 - it, "load_balancing_loss": [0.15, 0.16],
                "routing": {"layer_1": layer, "layer_2": layer}} for it in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
