"""What a run logs: ``metrics.jsonl`` (one strict-JSON object per logged step and per
validation), TensorBoard event files, and a Weights & Biases offline run, for a 4-iteration
2-rank ``moepp-train`` job logging every iteration and validating every 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.distributed import run_distributed
from tests.training.runs import metric_records, run_config_writer, train_rank

NUM_LAYERS, TOPK, TOKENS_PER_STEP = 4, 2, 512
LR, MIN_LR, WARMUP_INIT_LR = 3e-3, 3e-4, 1e-7


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrics")
    config = run_config_writer(tiny_data, directory)(
        "logged", training={"train_iters": 4, "eval_interval": 2},
        logging={"interval": 1, "tensorboard": True, "wandb": True, "wandb_mode": "offline"},
    )
    assert run_distributed(train_rank, 2, str(config), []) == [0, 0]
    return directory / "logged"


def _train(run_dir) -> dict[int, dict]:
    return {r["iteration"]: r for r in metric_records(run_dir) if "valid" not in r}


@pytest.mark.slow
def test_one_record_per_step_with_loss_lr_and_throughput(run_dir):
    train = _train(run_dir)
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
def test_moe_losses_and_routing_statistics_per_layer(run_dir):
    for record in _train(run_dir).values():
        balance = record["load_balancing_loss"]
        assert len(balance) == NUM_LAYERS and all(0 < value < 1 for value in balance)
        assert sorted(record["routing"]) == [f"layer_{i}" for i in range(1, NUM_LAYERS + 1)]
        for layer in record["routing"].values():
            assert sorted(layer["zc_share"]) == ["constant", "copy", "zero"]
            assert 0 < layer["ffn_experts_per_token"] <= TOPK
            assert layer["ffn_load_imbalance"] >= 1.0
            assert 0 <= layer["dropped_fraction"] < 1
            # Every top-k slot went to an FFN expert, to a ZC expert, or was dropped.
            slots = layer["ffn_experts_per_token"] / TOPK + sum(layer["zc_share"].values())
            assert slots + layer["dropped_fraction"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_validation_records(run_dir):
    valid = [r for r in metric_records(run_dir) if "valid" in r]
    assert [r["iteration"] for r in valid] == [2, 4]
    assert all(set(r) == {"iteration", "valid"} and math.isfinite(r["valid"]["lm_loss"]) for r in valid)
    assert valid[1]["valid"]["lm_loss"] < valid[0]["valid"]["lm_loss"]


@pytest.mark.slow
def test_tensorboard_scalars_match_the_jsonl(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = lambda tag: {e.step: e.value for e in events.Scalars(tag)}
    train, valid = _train(run_dir), {r["iteration"]: r["valid"] for r in metric_records(run_dir) if "valid" in r}
    # TensorBoard stores float32.
    assert scalars("train/lm_loss") == {it: np.float32(r["lm_loss"]) for it, r in train.items()}
    assert scalars("valid/lm_loss") == {it: np.float32(v["lm_loss"]) for it, v in valid.items()}
    assert scalars("train/routing/layer_3/zc_share/copy") == {
        it: np.float32(r["routing"]["layer_3"]["zc_share"]["copy"]) for it, r in train.items()
    }
    assert scalars("train/load_balancing_loss/1")[2] == np.float32(train[2]["load_balancing_loss"][1])


@pytest.mark.slow
def test_wandb_offline_run(run_dir):
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    data = records.read_bytes()
    # The history records hold the metric names and their JSON values as plain text.
    assert b"train/lm_loss" in data and b"valid/lm_loss" in data
    for record in _train(run_dir).values():
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
