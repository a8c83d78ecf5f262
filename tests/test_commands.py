"""Every command answers ``--help`` without importing torch, megatron-core or transformers
(seconds to minutes on a loaded machine); what they import is checked in a fresh process."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "megatron", "transformers", "matplotlib")
COMMANDS = sorted(
    (ep.name, ep.value) for ep in importlib.metadata.distribution("moepp-megatron").entry_points
    if ep.group == "console_scripts"
)
PROBE = """
import json, sys
module, function = sys.argv[1].split(":")
sys.argv = [sys.argv[2], "--help"]
main = getattr(__import__(module, fromlist=[function]), function)
try:
    main()
except SystemExit:
    pass
sys.__stdout__.write("\\n" + json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(%r))))
""" % (HEAVY,)


def test_every_command_is_probed():
    assert {"moepp-train", "moepp-preprocess", "moepp-convert", "moepp-bench"} <= {name for name, _ in COMMANDS}


@pytest.mark.parametrize("name,target", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_help_imports_nothing_heavy(name, target):
    out = subprocess.run([sys.executable, "-c", PROBE, target, name], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    *help_text, imported = out.stdout.splitlines()
    assert "usage:" in "\n".join(help_text)
    assert json.loads(imported) == [], f"{name} --help imports {imported}"
