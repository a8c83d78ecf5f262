"""Reading a checkpoint's run config: what older versions wrote still converts; checkpoints and
conversion sit below the trainer."""

from __future__ import annotations

import subprocess
import sys

import yaml

from moepp_megatron.checkpoint.checkpointer import iteration_dir
from moepp_megatron.config.loader import from_dict, to_dict
from moepp_megatron.config.schema import RunConfig
from moepp_megatron.conversion.megatron_checkpoint import CONFIG_FILE, read_run_config


def test_retired_fields_of_older_checkpoints_are_dropped(tmp_path):
    saved = to_dict(RunConfig())
    saved["checkpoint"]["async_save"] = False  # written by checkpoints before it was removed
    directory = iteration_dir(tmp_path, 250)
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(saved))
    assert from_dict(RunConfig, read_run_config(tmp_path, 250), where="test") == RunConfig()


def test_checkpoints_and_conversion_do_not_import_the_trainer():
    probe = (
        "import sys\n"
        "import moepp_megatron.checkpoint.checkpointer, moepp_megatron.conversion.to_hf, "
        "moepp_megatron.conversion.from_hf\n"
        "print(sorted(m for m in sys.modules if m.startswith('moepp_megatron.training')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
