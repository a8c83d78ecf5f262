"""YAML loading: base inheritance, dotted overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from moepp_megatron.config import DataSource, RunConfig, load_config, resolved_config_yaml, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_base_inheritance_and_overrides():
    config = load_config(CONFIGS / "moepp-1b-16+4e.yaml", ["model.moe.tau=0.25", "parallel.expert=8"])
    assert config.model.moe.num_ffn_experts == 16  # from the preset
    assert config.model.hidden_size == 768  # from its base
    assert config.model.norm_eps == 1e-6  # from the backbone
    assert config.model.moe.tau == 0.25 and config.parallel.expert == 8  # overrides
    assert to_dict(config)["model"]["moe"]["tau"] == 0.25


def test_unknown_key_names_the_dotted_path_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  moe:\n    num_experts: 8\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*model\.moe\.num_experts"):
        load_config(path)


def test_wrong_type_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: twelve\n")
    with pytest.raises(ValueError, match="model.num_layers='twelve' must be of type int"):
        load_config(path)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["model.moe.tau"])
    with pytest.raises(ValueError, match="model.moe.routing"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["model.moe.routing=fancy"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_packaged_configs_from_any_directory(tmp_path, monkeypatch):
    """A config not in the working directory is the packaged one: by name, or by its path in
    the repository; a file in the working directory wins."""
    monkeypatch.chdir(tmp_path)
    by_name = load_config(["moepp-0.6b-8+4e", "recipes/strategy1"])
    assert by_name == load_config([CONFIGS / "moepp-0.6b-8+4e.yaml", CONFIGS / "recipes/strategy1.yaml"])
    assert load_config("configs/tiny-cpu.yaml") == load_config(CONFIGS / "tiny-cpu.yaml")
    (tmp_path / "tiny-cpu.yaml").write_text("seed: 7\n")
    assert load_config("tiny-cpu.yaml").seed == 7
    with pytest.raises(FileNotFoundError, match=re.escape(f"config file not found: nope (looked in {tmp_path} and in")):
        load_config("nope")


def test_circular_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_several_bases_merge_in_order(tmp_path):
    (tmp_path / "model.yaml").write_text("model:\n  num_layers: 4\n  hidden_size: 64\n")
    (tmp_path / "recipe.yaml").write_text("optim:\n  lr: 1.0e-4\nmodel:\n  hidden_size: 128\n")
    (tmp_path / "run.yaml").write_text("base: [model.yaml, recipe.yaml]\nseed: 7\n")
    config = load_config(tmp_path / "run.yaml")
    assert (config.model.num_layers, config.model.hidden_size) == (4, 128)
    assert (config.optim.lr, config.seed) == (1e-4, 7)


def test_model_preset_and_recipe_layer_in_order():
    config = load_config(
        [CONFIGS / "moepp-0.6b-8+4e.yaml", CONFIGS / "recipes/strategy3.yaml"], ["data.root=/data"]
    )
    assert config.model.moe.num_ffn_experts == 8
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_iters) == (1e-4, 1e-5, 200)
    assert config.data.mixture == "configs/data/mix-s2.yaml" and config.data.root == "/data"
    assert config.training.train_tokens == 100_000_000_000


def test_floats_in_ordinary_notation(tmp_path):
    (tmp_path / "run.yaml").write_text("base: " + str(CONFIGS / "tiny-cpu.yaml") + "\noptim:\n  min_lr: 3e-5\n")
    config = load_config(tmp_path / "run.yaml", ["optim.lr=3e-4", "optim.warmup_init_lr=1E-7",
                                                 "training.train_iters=null", "training.train_tokens=2e9"])
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_init_lr) == (3e-4, 3e-5, 1e-7)
    assert config.training.train_tokens == 2_000_000_000 and isinstance(config.training.train_tokens, int)


def test_override_errors_name_the_override():
    with pytest.raises(ValueError, match=r"^override 'optim.lr=fast': optim.lr='fast' must be of type float"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"^override 'model.hiden_size=8': unknown config key model.hiden_size; valid: \["):
        load_config(CONFIGS / "tiny-cpu.yaml", ["model.hiden_size=8"])


def test_override_into_a_section_no_file_sets_keeps_its_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("base: " + str(CONFIGS / "tiny-cpu.yaml") + "\n")
    assert "training" not in (CONFIGS / "tiny-cpu.yaml").read_text()
    config = load_config(tmp_path / "run.yaml", ["training.micro_batch_size=2"])
    assert config.training.micro_batch_size == 2
    assert config.training.train_iters == load_config(tmp_path / "run.yaml").training.train_iters


def _reloaded(config, tmp_path):
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved_config_yaml(config))
    return load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("[!_]*.yaml")), ids=lambda p: p.stem)
def test_resolved_yaml_of_every_preset_reads_back_equal(path, tmp_path):
    config = load_config(path)
    assert _reloaded(config, tmp_path) == config


def test_resolved_yaml_lists_every_section_in_schema_order_and_reads_back_tricky_values(tmp_path):
    config = load_config(
        [CONFIGS / "moepp-7b-16+4e.yaml", CONFIGS / "recipes/strategy3.yaml"],
        ["data.root=/data", "model.moe.layer_freq=[1, 0]", "model.num_layers=2", "parallel.pipeline=1",
         "logging.wandb_project='3e-4'", "data.split='98,1,1'", "optim.min_lr=1e-5"],
    )
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, mixture=None, sources=[DataSource("a", 0.5), DataSource("1e5")], valid_sources=[DataSource("v")],
    ))
    text = resolved_config_yaml(config)
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(RunConfig)]
    back = _reloaded(config, tmp_path)
    assert back == config
    assert back.logging.wandb_project == "3e-4" and back.data.sources[1].prefix == "1e5"
