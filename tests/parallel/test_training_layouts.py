"""A few optimizer steps of the real trainer give the same losses in every layout, and
the 7B preset's layout (TP=1, PP=8) trains, scaled down, on 8 CPU processes."""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.training.conftest import CONFIGS, run_config, tiny_data  # noqa: F401 (fixtures)
from tests.training.runs import run_config_writer, train_losses, train_rank

LAYOUTS = {
    "single": (1, ["parallel.expert=1"]),
    "ep2": (2, ["parallel.expert=2"]),
    "pp2": (2, ["parallel.pipeline=2", "parallel.expert=1"]),
    "pp2-vpp2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.expert=1"]),
    # Inner stages read no data (tests/training/test_pipeline_data.py).
    "pp4": (4, ["parallel.pipeline=4", "parallel.expert=1"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=1"]),
}


@pytest.fixture(scope="module")
def layout_losses(tmp_path_factory, tiny_data):  # noqa: F811
    directory = tmp_path_factory.mktemp("layouts")
    path = run_config_writer(tiny_data, directory)(
        "run",
        model={"seq_length": 32, "moe": {"capacity_factor": None}},
        optim={"warmup_iters": 1},
        training={"train_iters": 4, "eval_interval": 100},
        checkpoint={"save_interval": 100},
    )
    # Initialisation depends on the layout (megatron seeds experts per EP rank), so every
    # layout starts from the same weights: one step of a single process, saved.
    seed_run = [f"run_dir={directory / 'seed'}", "training.train_iters=1",
                "optim.warmup_iters=0", "checkpoint.save_interval=1"]
    assert run_distributed(train_rank, 1, str(path), [*seed_run, *LAYOUTS["single"][1]]) == [0]
    out = {}
    for name, (world, overrides) in LAYOUTS.items():
        overrides = [*overrides, f"checkpoint.init_from={directory / 'seed' / 'checkpoints'}"]
        run_dir = directory / name
        codes = run_distributed(train_rank, world, str(path), [f"run_dir={run_dir}", *overrides])
        assert codes == [0] * world
        out[name] = train_losses(run_dir)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "single"])
def test_training_losses_match_single_process(layout_losses, layout):
    expected, losses = layout_losses["single"], layout_losses[layout]
    assert sorted(losses) == [1, 2, 3, 4]
    for iteration, loss in expected.items():
        assert losses[iteration] == pytest.approx(loss, rel=1e-5, abs=1e-6), (iteration, losses, expected)
    assert expected[4] < expected[1]


@pytest.mark.slow
def test_7b_layout_pp8_trains_scaled_down(run_config):  # noqa: F811
    # The 7B preset itself (24 layers, TP=1, PP=8, 16+4 experts, 2-layer router, release
    # routing) with tiny widths, over 8 processes: 3 layers per stage.
    path = run_config(
        "pp8", base=[str(CONFIGS / "moepp-7b-16+4e.yaml")],
        model={"hidden_size": 32, "num_attention_heads": 4, "head_dim": 8, "ffn_hidden_size": 32,
               "seq_length": 32, "moe": {"ffn_hidden_size": 16}},
        parallel={"cpu_mode": True},
        training={"train_iters": 3, "global_batch_tokens": 256, "micro_batch_size": 2,
                  "eval_interval": 3, "eval_iters": 1, "bf16": False},
        checkpoint={"save_interval": 3},
    )
    assert run_distributed(train_rank, 8, str(path), [], timeout=600) == [0] * 8
    losses = train_losses(path.parent / "pp8")
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]
