"""Reading a checkpoint's run config: what older versions wrote still converts."""

from __future__ import annotations

import yaml

from moepp_megatron.config.loader import from_dict, to_dict
from moepp_megatron.config.schema import RunConfig
from moepp_megatron.conversion.megatron_checkpoint import CONFIG_FILE, read_run_config
from moepp_megatron.training.checkpointing import iteration_dir


def test_retired_fields_of_older_checkpoints_are_dropped(tmp_path):
    saved = to_dict(RunConfig())
    saved["checkpoint"]["async_save"] = False  # written by checkpoints before it was removed
    directory = iteration_dir(tmp_path, 250)
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    assert from_dict(RunConfig, read_run_config(tmp_path, 250), where="test") == RunConfig()
