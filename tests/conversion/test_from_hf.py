"""Hugging Face -> megatron: round trips are bitwise, the released MoE++-7B config maps onto
the 7B preset, the trainer continues from a converted checkpoint, and checkpoints saved under
different layouts (EP=2, PP=2) convert to the same weights."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moepp_megatron.config import load_config
from moepp_megatron.config.loader import to_dict
from moepp_megatron.conversion.from_hf import import_from_hf
from moepp_megatron.conversion.hf_config import from_hf_config, to_hf_config
from moepp_megatron.conversion.to_hf import export_to_hf
from tests.conversion.helpers import hf_model, hf_tensors, megatron_logits, megatron_model
from tests.distributed import run_distributed
from tests.training.runs import CONFIGS, run_config_writer, train_losses, train_rank

# The released MoE++-7B config.json (docs/MOEPP_SPEC.md section 5).
RELEASED_7B_CONFIG = {
    "architectures": ["MoEPPForCausalLM"],
    "model_type": "MoE++",
    "vocab_size": 32000,
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "num_experts": [20],
    "moe_expert_interval": 1,
    "moe_use_mixtral_gating": False,
    "moe_2layer_gate": True,
    "moe_use_logits_norm": False,
    "moe_gate_norm_std": 1.0,
    "moe_feature_no_mul_topk": False,
}


def _assert_same_tensors(a: Path, b: Path) -> None:
    left, right = hf_tensors(a), hf_tensors(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


def test_released_7b_config_maps_onto_the_7b_preset():
    preset = load_config(CONFIGS / "moepp-7b-16+4e.yaml").model
    mapped = from_hf_config(RELEASED_7B_CONFIG)
    assert to_dict(mapped) == to_dict(dataclasses.replace(preset, vocab_size=32000))
    back = to_hf_config(mapped, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    assert back == {**RELEASED_7B_CONFIG, "auto_map": back["auto_map"]}


@pytest.mark.slow
@pytest.mark.parametrize("family, dtype", [("release", "bf16"), ("release", "fp32"), ("paper", "fp32"),
                                           ("vanilla", "fp32")])
def test_hf_megatron_hf_round_trip_is_bitwise(trained, tmp_path, family, dtype):
    hf_dir = trained.hf_dir(family, dtype)
    report = import_from_hf(hf_dir, tmp_path / "megatron", expert=2)
    print(f"from-hf {family} ({dtype}): {report.seconds:.2f} s")
    export_to_hf(tmp_path / "megatron", tmp_path / "hf", dtype=dtype)
    _assert_same_tensors(hf_dir, tmp_path / "hf")
    assert json.loads((tmp_path / "hf/config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "modeling_moepp.py"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name


@pytest.mark.slow
def test_released_format_directory_converts_and_computes_the_same_logits(trained, tmp_path):
    """A directory as released (config.json of the released field set, no auto_map, no code
    files) converts; megatron then computes the HF model's logits."""
    source = trained.hf_dir("release")
    released = tmp_path / "released"
    released.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.pop("auto_map")
    (released / "config.json").write_text(json.dumps(config))
    for file in source.glob("*.safetensors*"):
        (released / file.name).write_bytes(file.read_bytes())
    import_from_hf(released, tmp_path / "megatron")
    gpt = megatron_model(tmp_path / "megatron")
    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(source)(ids).logits
    assert (megatron_logits(gpt, ids) - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_unpadded_vocabulary_gets_zero_rows(trained, tmp_path):
    """A HF model whose vocab_size is the tokenizer's (400) gets megatron's 512 rows; the
    logits of the real vocabulary are unchanged."""
    from moepp_megatron.conversion.hf_files import write_safetensors

    source = trained.hf_dir("paper")
    sliced = tmp_path / "sliced"
    sliced.mkdir()
    config = {**json.loads((source / "config.json").read_text()), "vocab_size": 400}
    (sliced / "config.json").write_text(json.dumps(config))
    (sliced / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
    tensors = hf_tensors(source)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:400]
    write_safetensors(tensors, sliced, max_shard_bytes=1 << 30)
    report = import_from_hf(sliced, tmp_path / "megatron")
    assert report.padded_vocab_rows == 112 and report.model.vocab_size == 512
    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model(source)(ids).logits[..., :400]
    logits = megatron_logits(megatron_model(tmp_path / "megatron"), ids)
    assert (logits[..., :400] - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_trainer_continues_pretraining_from_a_converted_checkpoint(trained, conversion_data, tmp_path):
    """HF -> moepp-convert from-hf (EP=2 layout) -> moepp-train with checkpoint.init_from on
    2 processes. One step at learning rate 0 (warmup from 0) leaves the weights as they were,
    so the trainer's checkpoint converts back to the same HF weights."""
    hf_dir = trained.hf_dir("release")
    command = [sys.executable, "-m", "moepp_megatron.conversion.cli", "from-hf", "--hf", str(hf_dir),
               "--output", str(tmp_path / "converted"), "--ep", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "checkpoint.init_from=" in done.stdout
    fragment = yaml.safe_load((tmp_path / "converted/run.yaml").read_text())
    assert fragment["parallel"]["expert"] == 2
    assert Path(fragment["data"]["tokenizer_model"]).read_bytes() == Path(conversion_data[0]).read_bytes()

    config = run_config_writer(conversion_data, tmp_path)(
        "continued",
        base=[str(tmp_path / "converted/run.yaml")],
        parallel={"cpu_mode": True},
        optim={"warmup_iters": 5, "warmup_init_lr": 0.0, "decay_iters": 10},
        training={"train_iters": 1},
    )
    overrides = [f"checkpoint.init_from={tmp_path / 'converted'}"]
    assert run_distributed(train_rank, 2, str(config), overrides) == [0, 0]
    losses = train_losses(tmp_path / "continued")
    assert list(losses) == [1] and losses[1] < 6.0  # a fresh model starts at ln(512) = 6.24
    export_to_hf(tmp_path / "continued", tmp_path / "back", dtype="fp32")
    _assert_same_tensors(hf_dir, tmp_path / "back")


def _resave_with_pipeline_parallel(source: str, target: str) -> None:
    """One rank of: load a checkpoint into a PP=2 model and save it in that layout."""
    from moepp_megatron.checkpoint.checkpointer import Checkpointer, TrainState, read_latest_iteration
    from moepp_megatron.config.loader import from_dict
    from moepp_megatron.config.schema import CheckpointConfig, RunConfig
    from moepp_megatron.model.builder import build_model
    from moepp_megatron.parallel.initialize import initialize_parallel

    initialize_parallel(pipeline_parallel=2, cpu_mode=True)
    iteration = read_latest_iteration(Path(source))
    saved = yaml.safe_load((Path(source) / f"iter_{iteration:07d}/config.yaml").read_text())
    run = from_dict(RunConfig, saved, where=source)
    run = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, pipeline=2, expert=1))
    chunks = build_model(run.model, run.parallel)
    Checkpointer(source, CheckpointConfig(), chunks).load(iteration, run)
    Checkpointer(target, CheckpointConfig(keep_last=1), chunks).save(iteration, TrainState(iteration=iteration), run)


@pytest.mark.slow
def test_ep2_and_pp2_checkpoints_convert_to_the_same_weights(trained, tmp_path):
    source = trained.run_dir("release") / "checkpoints"
    run_distributed(_resave_with_pipeline_parallel, 2, str(source), str(tmp_path / "pp2"))
    saved = yaml.safe_load(next((tmp_path / "pp2").glob("iter_*/config.yaml")).read_text())
    assert saved["parallel"]["pipeline"] == 2
    export_to_hf(tmp_path / "pp2", tmp_path / "hf-pp2", dtype="fp32")
    _assert_same_tensors(trained.hf_dir("release"), tmp_path / "hf-pp2")
