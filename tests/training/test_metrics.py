"""What a run logs: ``metrics.jsonl`` (one strict-JSON object per logged step and per
validation), TensorBoard event files, and a Weights & Biases offline run, for a 4-iteration
2-rank ``moepp-train`` job logging every iteration and validating every 2 (``logged_run``);
and reading metrics.jsonl back, also as older versions wrote it."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from moepp_megatron.training.metrics import read_metrics
from tests.training.runs import metric_records

NUM_LAYERS, TOPK, TOKENS_PER_STEP = 4, 2, 512
LAYERS = [f"layer_{i}" for i in range(1, NUM_LAYERS + 1)]
LR, MIN_LR, WARMUP_INIT_LR = 3e-3, 3e-4, 1e-7


def _train(run_dir) -> dict[int, dict]:
    return {r["iteration"]: r for r in metric_records(run_dir) if "valid" not in r}


@pytest.mark.slow
def test_one_record_per_step_with_loss_lr_and_throughput(logged_run):
    train = _train(logged_run)
    assert sorted(train) == [1, 2, 3, 4]
    for iteration, record in train.items():
        assert record["consumed_tokens"] == iteration * TOKENS_PER_STEP
        assert math.isfinite(record["lm_loss"]) and 4.0 < record["lm_loss"] < 7.0
        assert record["grad_norm"] > 0 and record["tokens_per_s"] > 0
    # The LR after each step: linear warmup over 2 iterations, then cosine to the minimum.
    expected_lr = {1: WARMUP_INIT_LR + (LR - WARMUP_INIT_LR) / 2, 2: LR, 3: MIN_LR + (LR - MIN_LR) / 2, 4: MIN_LR}
    assert {it: r["lr"] for it, r in train.items()} == pytest.approx(expected_lr, rel=1e-9)
    assert train[4]["lm_loss"] < train[1]["lm_loss"]


@pytest.mark.slow
def test_moe_losses_and_routing_statistics_per_layer(logged_run):
    for record in _train(logged_run).values():
        balance = record["load_balancing_loss"]
        assert list(balance) == LAYERS and all(0 < value < 1 for value in balance.values())
        assert list(record["routing"]) == LAYERS
        for layer in record["routing"].values():
            picked, kept, dropped = layer["picked"], layer["kept"], layer["dropped_fraction"]
            assert set(picked) == set(kept) == {"ffn_experts_per_token", "zc_share", "expert_load", "ffn_load_imbalance"}
            assert 0 <= dropped < 1
            for side, share_of_slots in ((picked, 1.0), (kept, 1.0 - dropped)):
                # Columns: 4 FFN experts, 2 constant, 1 copy, 1 zero.
                load = side["expert_load"]
                assert len(load) == 8 and sum(load) == pytest.approx(share_of_slots, abs=1e-6)
                assert side["ffn_experts_per_token"] == pytest.approx(sum(load[:4]) * TOPK, abs=1e-6)
                assert side["zc_share"] == pytest.approx({"constant": load[4] + load[5], "copy": load[6], "zero": load[7]})
                assert side["ffn_load_imbalance"] == pytest.approx(max(load[:4]) / (sum(load[:4]) / 4))
            # Dropping only removes assignments.
            assert all(k <= p for k, p in zip(kept["expert_load"], picked["expert_load"]))


@pytest.mark.slow
def test_validation_records(logged_run):
    valid = [r for r in metric_records(logged_run) if "valid" in r]
    assert [r["iteration"] for r in valid] == [2, 4]
    assert all(set(r) == {"iteration", "valid"} and math.isfinite(r["valid"]["lm_loss"]) for r in valid)
    assert valid[1]["valid"]["lm_loss"] < valid[0]["valid"]["lm_loss"]


@pytest.mark.slow
def test_tensorboard_scalars_match_the_jsonl(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard"))
    events.Reload()
    scalars = lambda tag: {e.step: e.value for e in events.Scalars(tag)}
    train, valid = _train(logged_run), {r["iteration"]: r["valid"] for r in metric_records(logged_run) if "valid" in r}
    # TensorBoard stores float32.
    assert scalars("train/lm_loss") == {it: np.float32(r["lm_loss"]) for it, r in train.items()}
    assert scalars("valid/lm_loss") == {it: np.float32(v["lm_loss"]) for it, v in valid.items()}
    assert scalars("valid/lm_loss_dropless") == {it: np.float32(v["lm_loss_dropless"]) for it, v in valid.items()}
    for when in ("picked", "kept"):
        assert scalars(f"train/routing/layer_3/{when}/zc_share/copy") == {
            it: np.float32(r["routing"]["layer_3"][when]["zc_share"]["copy"]) for it, r in train.items()
        }
    assert scalars("train/load_balancing_loss/layer_2")[2] == np.float32(train[2]["load_balancing_loss"]["layer_2"])
    # One layer numbering in every tag, the jsonl's.
    tags = events.Tags()["scalars"]
    assert {part for tag in tags for part in tag.split("/") if re.fullmatch(r"layer_\d+", part)} == set(LAYERS)
    assert not [tag for tag in tags if tag.startswith("train/load_balancing_loss/") and "layer_" not in tag]


@pytest.mark.slow
def test_wandb_offline_run(logged_run):
    (run,) = (logged_run / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    data = records.read_bytes()
    # The history records hold the metric names and their JSON values as plain text.
    assert b"train/lm_loss" in data and b"valid/lm_loss" in data
    for record in _train(logged_run).values():
        assert json.dumps(record["lm_loss"]).encode() in data
    assert b"num_ffn_experts" in data  # the run config


def test_a_resumed_run_drops_the_rolled_back_records(tmp_path):
    """After a crash at iteration 5 and a resume from the checkpoint of iteration 3,
    metrics.jsonl and TensorBoard hold iterations 1-3 once, then the resumed run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moepp_megatron.config.schema import LoggingConfig
    from moepp_megatron.training.metrics import MetricsLogger

    config = LoggingConfig(tensorboard=True)
    crashed = MetricsLogger(config, tmp_path, {}, enabled=True)
    crashed.open(0)
    for iteration in range(1, 6):
        crashed.log(iteration, {"lm_loss": float(iteration)})
        crashed.log(iteration, {"lm_loss": 0.5}, prefix="valid")
    crashed.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lm_lo')  # the crash cut this line

    resumed = MetricsLogger(config, tmp_path, {}, enabled=True)
    resumed.open(3)
    resumed.log(4, {"lm_loss": 40.0})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], "valid" in r) for r in records] == [
        (1, False), (1, True), (2, False), (2, True), (3, False), (3, True), (4, False)
    ]
    assert records[-1]["lm_loss"] == 40.0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/lm_loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_older_records_are_read_in_todays_layout(tmp_path):
    """Records as written before per-layer metrics were keyed by layer number and routing
    was split into picked / kept; a last line a live run is still writing is left out."""
    old = {
        "iteration": 10, "lm_loss": 8.8, "load_balancing_loss": [0.15, 0.16],
        "routing": {f"layer_{n}": {
            "ffn_experts_per_token": 1.15, "zc_share": {"zero": 0.06}, "picked_ffn_experts_per_token": 1.33,
            "picked_zc_share": {"zero": 0.07}, "ffn_load_imbalance": 1.14, "dropped_fraction": 0.09,
        } for n in (1, 2)},
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n" + '{"iteration": 11, "lm_lo')

    (record,) = read_metrics(tmp_path)

    assert record["load_balancing_loss"] == {"layer_1": 0.15, "layer_2": 0.16}
    assert record["routing"]["layer_2"] == {
        "picked": {"ffn_experts_per_token": 1.33, "zc_share": {"zero": 0.07}},
        "kept": {"ffn_experts_per_token": 1.15, "zc_share": {"zero": 0.06}, "ffn_load_imbalance": 1.14},
        "dropped_fraction": 0.09,
    }
