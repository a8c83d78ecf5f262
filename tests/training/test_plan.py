"""The whole config checked before any process starts: each mistake a new user makes is one
ValueError (a ConfigError from the plan) naming the field to change (in this process; the CLI's behaviour is in
test_cli.py), and the plan's data blend counts the tokens that are there."""

from __future__ import annotations

import numpy as np
import pytest

from moepp_megatron.config import load_config
from moepp_megatron.training.plan import plan_run

# (overrides, world size, what the message must name); the tiny run: 4 FFN experts, EP=2,
# 4 layers, 16 sequences of 32 tokens per step, 8 iterations, micro-batch 4.
MISTAKES = {
    "experts vs expert parallelism": (["parallel.expert=3"], 3, "model.moe.num_ffn_experts=4 is not divisible by parallel.expert=3"),
    "world size vs layout": (["parallel.tensor=2"], 3, "on 3 processes"),
    "warmup vs iterations": (["optim.warmup_iters=8"], 2, "optim.warmup_iters=8 must be smaller"),
    "batch vs micro-batch x DP": (["training.micro_batch_size=3"], 2, "micro_batch_size (3) x data-parallel size (2)"),
    "layer_freq length": (["model.moe.layer_freq=[1,0,1]"], 2, "model.moe.layer_freq"),
    "lr below warmup_init_lr": (["optim.lr=1e-8", "optim.min_lr=0"], 2, "optim.warmup_init_lr=1e-07 is above optim.lr=1e-08"),
    "heads vs tensor parallelism": (["parallel.tensor=3", "parallel.expert=1"], 3, "model.num_attention_heads"),
    "no tokenizer": (["data.tokenizer_model=null"], 2, "data.tokenizer_model is not set"),
    "missing tokenizer": (["data.tokenizer_model=/nonexistent/t.model"], 2, "data.tokenizer_model: tokenizer model not found"),
    "bad split": (["data.split=90,10"], 2, "data.split='90,10'"),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_each_mistake_is_one_error_naming_the_field(run_config, name):
    overrides, world_size, expected = MISTAKES[name]
    # ConfigError, or the ValueError of a section's own check when the file is read.
    with pytest.raises(ValueError) as error:
        plan_run(load_config(run_config(), overrides), world_size)
    assert expected in str(error.value)


def test_missing_data_names_every_missing_source(run_config, tmp_path):
    config = load_config(run_config(), [f"data.sources=[{{prefix: {tmp_path}/nothing}}]"])
    with pytest.raises(FileNotFoundError, match="nothing"):
        plan_run(config, 2)


def test_plan_of_the_tiny_run(run_config, tiny_data):
    plan = plan_run(load_config(run_config()), 2)
    assert (plan.layout.data, plan.layout.expert_data) == (2, 1)
    assert plan.geometry.num_microbatches == 2 and plan.geometry.train_iters == 8
    assert plan.config.model.vocab_size % 128 == 0 and plan.tokenizer_pieces <= plan.config.model.vocab_size
    assert plan.resume_iteration is None
    _, prefixes = tiny_data
    for source, prefix, weight in zip(plan.sources, prefixes, (5, 3, 2)):
        tokens = np.fromfile(f"{prefix}.bin", dtype=np.uint16).size  # the tiny vocabulary fits uint16
        assert source.tokens == int(tokens * 0.9)  # split 90,10,0
        assert source.share == pytest.approx(weight / 10)
        assert source.epochs == pytest.approx(8 * 16 * 32 * weight / 10 / source.tokens)
