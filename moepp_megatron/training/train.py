"""``moepp-train --config PATH [--config PATH ...] [dotted.key=value ...]``: pretraining,
launched by torchrun (see scripts/pretrain.sh), e.g.

    moepp-train --config configs/moepp-0.6b-8+4e.yaml --config configs/recipes/strategy1.yaml \
        data.root=/data/moepp run_dir=/runs/moepp-0.6b

Checks the whole config first (one message naming the field; ``--check`` does only that,
``--dry-run`` also prints the plan), prints a start-up block (model, parameters, layout,
batch, memory estimate, data blend, run directory), writes the resolved config to
``<run_dir>/config.yaml``, trains (resuming from the run directory's newest checkpoint that
verifies, when there is one) and exits 0 when done (also when the run was already
complete), 75 when stopped early with a checkpoint (SIGTERM / SIGUSR1 / SIGINT, or
``training.exit_after_iters``: run it again to continue), 1 on an error, printed once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from moepp_megatron.signals import stop_request

# First thing: a stop signal during the minutes of start-up is recorded, not lost.
stop_request.install()

from moepp_megatron.known_warnings import ignore_known_warnings  # noqa: E402

ignore_known_warnings()

from moepp_megatron.config import load_config, resolved_config_yaml  # noqa: E402
from moepp_megatron.training.plan import (  # noqa: E402
    ConfigError,
    describe,
    describe_step_time,
    plan_run,
    resolve,
    smallest_world_size,
)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except Exception as e:
        # (A config error is checked first: the other kinds import the trainer.)
        if not isinstance(e, ConfigError) and not isinstance(e, _clear_errors()):
            raise
        # Every rank raises it; one message is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


def _clear_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what happened and what to do: no traceback. (Imported
    only when an error happened: ``--help`` and config errors stay fast.)"""
    from moepp_megatron.checkpoint.checkpointer import CheckpointError
    from moepp_megatron.data.blend import DataFileError
    from moepp_megatron.parallel.layout import NoCudaError
    from moepp_megatron.training.run_dir import RunDirLockedError
    from moepp_megatron.training.trainer import NonFiniteLossError, NonFiniteWeightsError

    return (CheckpointError, DataFileError, FileNotFoundError, NoCudaError, RunDirLockedError,
            NonFiniteLossError, NonFiniteWeightsError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moepp-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, action="append",
        help="run config YAML (see configs/, every field in docs/config.md), or a packaged one by name "
             "(moepp-0.6b-8+4e, recipes/strategy1); repeat to layer files, later ones win",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=3e-4")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="check the config, print the plan (layout, parameters, FLOPs, memory per rank, "
                           "data blend, run directory, expected step time) and exit; starts no process")
    mode.add_argument("--check", action="store_true",
                      help="check the config and exit, printing only errors (scripts/pretrain.sh runs "
                           "this before torchrun)")
    mode.add_argument("--print-config", action="store_true",
                      help="print the resolved config as YAML (every field) and exit")
    parser.add_argument("--world-size", type=int,
                        help="processes to plan for (default: WORLD_SIZE under torchrun; else, for --check and "
                             "--dry-run, the smallest number that fits the layout)")
    parser.add_argument("--gpu", help="with --dry-run: the GPU to estimate the step time for (default: this "
                                      "machine's, else A100, the paper's)")
    parser.add_argument("--layer-costs", type=Path, help="with --dry-run: a directory of `moepp-bench costs` "
                                                         "records (default: bench/results of this checkout)")
    parser.add_argument("--verbose", action="store_true", help="also print the resolved config at start")
    return parser


def _main(argv) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.gpu or args.layer_costs) and not args.dry_run:
        parser.error("--gpu and --layer-costs go with --dry-run")
    try:
        config = load_config(args.config, args.overrides)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if args.print_config:
        print(resolved_config_yaml(resolve(config)), end="")
        return 0
    # Checked by hand (no launcher, no --world-size): the smallest world size the layout fits.
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "0")) or (
        smallest_world_size(config) if args.dry_run or args.check else 1)
    if args.dry_run:  # a wrong --gpu or --layer-costs before anything is printed
        target, costs = _target_gpu(args.gpu), _costs_records(args.layer_costs)
    plan = plan_run(config, world_size)
    if args.check:
        return 0
    if args.dry_run:
        print(describe(plan))
        print(describe_step_time(plan, target, costs))
        return 0

    from moepp_megatron.training.run_dir import stop_when_orphaned
    from moepp_megatron.training.trainer import Trainer

    # torchrun starts workers in sessions of their own: stop when it is gone.
    stop_when_orphaned(lambda: os.kill(os.getpid(), signal.SIGTERM))
    trainer = Trainer(config, plan)
    if args.verbose:
        trainer.metrics.print("resolved config:\n" + resolved_config_yaml(trainer.resolved))
    return trainer.run()


def _target_gpu(name: str | None):
    import torch

    from moepp_megatron.bench.presets import PAPER_GPU
    from moepp_megatron.model.hardware import GPUS, find_gpu

    name = name or (torch.cuda.get_device_name() if torch.cuda.is_available() else PAPER_GPU)
    gpu = find_gpu(name)
    if gpu is None:
        raise ConfigError(f"GPU {name!r}: no data sheet for it in model/hardware.py; --gpu takes one of "
                          f"{', '.join(g.name for g in GPUS)}")
    return gpu


def _costs_records(directory: Path | None) -> list[dict]:
    from moepp_megatron.bench.records import IN_CHECKOUT, REPO_ROOT, records_of

    directory = directory or (REPO_ROOT / "bench/results" if IN_CHECKOUT else None)
    if directory is not None and not directory.is_dir():
        raise ConfigError(f"--layer-costs {directory}: not a directory")
    return records_of("costs", directory) if directory else []


if __name__ == "__main__":
    sys.exit(main())
