"""Corrupt or mismatched inputs fail with messages that say what is wrong and where."""

from __future__ import annotations

import json
import shutil

import pytest

from moepp_megatron.checkpoint.checkpointer import TRACKER
from moepp_megatron.conversion.from_hf import import_from_hf
from moepp_megatron.conversion.hf_config import from_hf_config
from moepp_megatron.conversion.to_hf import export_to_hf


@pytest.fixture
def hf_copy(trained, tmp_path):
    """A writable copy of the release family's HF directory, in several shards."""
    from moepp_megatron.conversion.hf_files import read_safetensors, write_safetensors

    source = trained.hf_dir("release")
    target = tmp_path / "hf"
    target.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(source / name, target / name)
    write_safetensors(read_safetensors(source), target, max_shard_bytes=200_000)
    return target


def _edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.slow
def test_missing_shard_is_named(hf_copy, tmp_path):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard.*{shard.name}"):
        import_from_hf(hf_copy, tmp_path / "out")


@pytest.mark.slow
def test_truncated_shard_is_named(hf_copy, tmp_path):
    shard = sorted(hf_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{shard.name}: unreadable safetensors"):
        import_from_hf(hf_copy, tmp_path / "out")


@pytest.mark.slow
def test_config_that_does_not_match_the_weights_names_the_tensor(hf_copy, tmp_path):
    _edit_config(hf_copy, intermediate_size=80)
    with pytest.raises(ValueError, match=r"experts\.experts\.0\.up_proj\.weight has shape \(192, 64\), config.json implies \(160, 64\)"):
        import_from_hf(hf_copy, tmp_path / "out")


@pytest.mark.slow
def test_config_with_other_layers_lists_missing_tensors(hf_copy, tmp_path):
    _edit_config(hf_copy, num_hidden_layers=5)
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.4\."):
        import_from_hf(hf_copy, tmp_path / "out")


def test_unknown_model_type():
    with pytest.raises(ValueError, match=r"model_type 'llama' is not one of \['MoE\+\+', 'moepp-megatron'\]"):
        from_hf_config({"model_type": "llama", "hidden_size": 64})


def test_unsupported_released_options_are_refused():
    with pytest.raises(ValueError, match="moe_use_mixtral_gating"):
        from_hf_config({"model_type": "MoE++", "moe_use_mixtral_gating": True})
    with pytest.raises(ValueError, match="moe_feature_no_mul_topk"):
        from_hf_config({"model_type": "MoE++", "moe_feature_no_mul_topk": True})
    # What the released code would ignore (as exports before model_type "moepp-megatron" had it).
    with pytest.raises(ValueError, match="moepp_routing='paper'.* has model_type 'moepp-megatron'"):
        from_hf_config({"model_type": "MoE++", "moepp_routing": "paper", "moe_feature_no_mul_topk": True})


def test_missing_hf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_from_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "MoE++"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json and no model.safetensors"):
        import_from_hf(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_checkpoint_dir_without_tracker_or_iteration(trained, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(trained.run_dir("vanilla") / "checkpoints", checkpoints)
    (checkpoints / TRACKER).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {TRACKER}; pick a checkpoint with --iteration.*iter_0000003"):
        export_to_hf(checkpoints, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="iter_0000007 does not exist"):
        export_to_hf(checkpoints, tmp_path / "hf", iteration=7)
    export_to_hf(checkpoints, tmp_path / "hf", iteration=3, dtype="fp32")  # explicit: fine
    export_to_hf(checkpoints / "iter_0000003", tmp_path / "hf-iter", dtype="fp32")  # so is the iter dir
    shutil.rmtree(checkpoints / "iter_0000003")
    with pytest.raises(FileNotFoundError, match="no megatron checkpoint here"):
        export_to_hf(checkpoints, tmp_path / "hf2")


def test_output_must_be_new(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/file").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        export_to_hf(tmp_path, tmp_path / "hf")
