"""Resolve a run's configs the way moepp-train does and print what the Slurm scripts need:

    python scripts/slurm/resolve_run.py CONFIG [CONFIG ...] [--config C] [key=value ...]
    run_dir=/abs/path/of/the/run
    target_iters=23841
    latest_iteration=1000        (0 when the run has no checkpoint yet)

target_iters is the trainer's iteration count: training.train_iters, or
training.train_tokens // training.global_batch_tokens. A run is complete when
<run_dir>/checkpoints/latest_checkpointed_iteration.txt reaches it (the trainer always saves
at its last iteration). Needs only PyYAML and this repository (no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from moepp_megatron.config import load_config  # noqa: E402

TRACKER = "latest_checkpointed_iteration.txt"


def parse(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading bare paths are configs (scripts/pretrain.sh's form), then moepp-train's."""
    leading = []
    while argv and "=" not in argv[0] and not argv[0].startswith("-"):
        leading.append(argv.pop(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    configs = leading + args.config
    if not configs:
        parser.error("no config file given")
    return configs, args.overrides


def target_iters(config) -> int:
    t = config.training
    return t.train_iters if t.train_iters is not None else t.train_tokens // t.global_batch_tokens


def main(argv=None) -> int:
    configs, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    config = load_config(configs, overrides)
    run_dir = Path(config.run_dir).absolute()
    tracker = run_dir / "checkpoints" / TRACKER
    latest = int(tracker.read_text().strip()) if tracker.is_file() else 0
    print(f"run_dir={run_dir}")
    print(f"target_iters={target_iters(config)}")
    print(f"latest_iteration={latest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
