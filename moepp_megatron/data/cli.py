"""What the data commands (moepp-preprocess, moepp-tokenizer train) share: the options naming
their input, and how a run ends: exit status 0 with the summary on stdout, 1 with a one-line
message on stderr, 130 when interrupted."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Protocol


class Summary(Protocol):
    def format(self) -> str: ...


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--input, --text-field and --strict (see :mod:`moepp_megatron.data.readers`)."""
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="FILE_OR_DIR_OR_GLOB",
        help="input files, directories (searched recursively) or globs",
    )
    parser.add_argument(
        "--text-field", default="text", help="JSON key / parquet column holding the text"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed record")


def run(command: str, work: Callable[[], Summary]) -> int:
    """Do ``work`` and report how it went; the exit status."""
    try:
        summary = work()
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line and exit 1
        print(f"{command}: error: {err}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0
