"""moepp-eval runs lm-evaluation-harness on a converted model, here on a task built from
local files (nothing is downloaded), and writes the results table."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from moepp_megatron.config.schema import DataConfig, ParallelConfig, RunConfig
from moepp_megatron.conversion.megatron_checkpoint import save_state
from moepp_megatron.conversion.to_hf import export_to_hf
from moepp_megatron.evaluation.harness import PAPER_TASKS, parse_tasks
from moepp_megatron.model.builder import build_model
from tests.fixtures import tiny_sentencepiece
from tests.tiny_models import tiny_model

DOCS = [
    {"question": "The return statement", "choices": ["leaves the function", "banana", "42"], "label": 0},
    {"question": "A class definition", "choices": ["qwerty", "creates a class object", "!!"], "label": 1},
    {"question": "import sys", "choices": ["zz", "yy", "loads a module"], "label": 2},
    {"question": "for x in range(3):", "choices": ["loops", "ab", "cd"], "label": 0},
]
TASK_YAML = """task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
fewshot_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def converted_model(single_process, tmp_path):
    """A randomly initialised tiny MoE++ (released family) saved as a megatron checkpoint
    and converted to Hugging Face."""
    tokenizer = tiny_sentencepiece(tmp_path)
    model = dataclasses.replace(tiny_model(router="mlp", routing="release"), vocab_size=512, seq_length=64)
    torch.manual_seed(0)
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    run = RunConfig(model=model, data=DataConfig(tokenizer_model=str(tokenizer)))
    save_state(state, run, tmp_path / "checkpoints")
    return export_to_hf(tmp_path / "checkpoints", tmp_path / "hf", dtype="fp32").output


def test_paper_preset_is_the_spec_table():
    assert PAPER_TASKS == {
        "arc_easy": 0, "lambada_openai": 0, "logiqa": 0, "piqa": 0, "sciq": 0, "winogrande": 0,
        "hellaswag": 10, "arc_challenge": 25, "mmlu": 5, "nq_open": 32, "boolq": 32,
    }
    assert parse_tasks(["piqa", "hellaswag:10"]) == {"piqa": 0, "hellaswag": 10}
    with pytest.raises(ValueError, match="NAME:SHOTS"):
        parse_tasks(["hellaswag:ten"])


@pytest.mark.slow
def test_moepp_eval_on_a_local_task(converted_model, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_local.yaml").write_text(TASK_YAML.format(data=tasks / "tiny.jsonl"))
    # Without the launcher variables the single_process fixture set (lm-eval would join that group).
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")})
    command = [sys.executable, "-m", "moepp_megatron.evaluation.cli", "--model", str(converted_model),
               "--output", str(tmp_path / "results"), "--include-path", str(tasks), "--tasks", "tiny_local:1",
               "--dtype", "float32"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "results/results.json").read_text())["results"]
    acc = [r for r in results if r["task"] == "tiny_local" and r["metric"] == "acc"]
    assert len(acc) == 1 and acc[0]["shots"] == 1 and 0.0 <= acc[0]["value"] <= 1.0
    table = (tmp_path / "results/results.md").read_text()
    assert "| tiny_local | 1 | acc |" in table
