"""Tiny models of each family, trained a few steps by the real trainer under EP=2 on two
processes, and converted to Hugging Face once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.fixtures import tiny_blend
from tests.training.runs import run_config_writer, train_rank

# Three steps of 8 sequences of 32 tokens; no validation or checkpoint before the end.
SHORT_RUN = {
    "training": {"train_iters": 3, "global_batch_tokens": 256, "eval_interval": 100},
    "checkpoint": {"save_interval": 100},
}

# The released MoE++-7B family: 2-layer router, release routing, 2 constant + 1 copy + 1 zero.
RELEASE = {"moe": {"router": "mlp", "routing": "release"}}
# Config sections per family. "paper": another ZC mix, linear router, no capacity,
# grouped-query attention, a dense layer. "release-bf16": the release family trained in bf16
# (bf16 weights in the checkpoint, as GPU runs write them).
FAMILIES = {
    "release": {"model": RELEASE},
    "paper": {"model": {
        "num_query_groups": 2,
        "moe": {
            "num_zero_experts": 1, "num_copy_experts": 2, "num_constant_experts": 3,
            "router": "linear", "routing": "paper", "capacity_factor": None, "layer_freq": [1, 0, 1, 1],
        },
    }},
    "vanilla": {"model": {"moe": {"method": "vanilla"}}},
    "release-bf16": {"model": RELEASE, "training": {"bf16": True}},
}


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """Nothing in these tests may reach the Hugging Face hub."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def conversion_data(tmp_path_factory):
    return tiny_blend(tmp_path_factory.mktemp("conversion-blend"))


class TrainedRuns:
    """One run per family, trained on first use (EP=2, 2 processes, 3 steps, seq 32)."""

    def __init__(self, root: Path, data) -> None:
        self.root, self.data = root, data
        self._runs: dict[str, Path] = {}
        self._exports: dict[tuple[str, str], Path] = {}

    def run_dir(self, family: str) -> Path:
        if family not in self._runs:
            sections = {name: {**SHORT_RUN.get(name, {}), **values} for name, values in FAMILIES[family].items()}
            config = run_config_writer(self.data, self.root)(family, **{**SHORT_RUN, **sections})
            assert run_distributed(train_rank, 2, str(config), []) == [0, 0]
            self._runs[family] = self.root / family
        return self._runs[family]

    def hf_dir(self, family: str, dtype: str = "fp32") -> Path:
        """The family's run converted with ``moepp-convert to-hf`` (in this process)."""
        from moepp_megatron.conversion.to_hf import export_to_hf

        key = (family, dtype)
        if key not in self._exports:
            report = export_to_hf(self.run_dir(family), self.root / f"{family}-hf-{dtype}", dtype=dtype)
            print(f"to-hf {family} ({dtype}): {report.seconds:.2f} s, {report.num_parameters:,} parameters")
            self._exports[key] = report.output
        return self._exports[key]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, conversion_data) -> TrainedRuns:
    return TrainedRuns(tmp_path_factory.mktemp("conversion-runs"), conversion_data)
