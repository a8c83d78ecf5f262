"""``moepp-train --config PATH [--config PATH ...] [dotted.key=value ...]``: pretraining,
launched by torchrun (see scripts/pretrain.sh), e.g.

    moepp-train --config configs/moepp-0.6b-8+4e.yaml --config configs/recipes/strategy1.yaml \
        data.root=/data/moepp run_dir=/runs/moepp-0.6b

Prints the resolved config, trains (resuming from the run directory's newest checkpoint
that verifies, when there is one) and exits 0 when done (also when the run was already
complete), 75 when stopped by SIGTERM / SIGUSR1 / SIGINT after saving a checkpoint (run it
again to continue), 1 on an error, printed once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from moepp_megatron.training.signals import stop_request

# First thing: a stop signal during the minutes of start-up is recorded, not lost.
stop_request.install()

import yaml  # noqa: E402

from moepp_megatron.config import load_config  # noqa: E402


def main(argv=None) -> int:
    try:
        return _main(argv)
    except _clear_errors() as e:
        # Every rank raises it; one message is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


def _clear_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what happened and what to do: no traceback."""
    from moepp_megatron.data.blend import DataFileError
    from moepp_megatron.parallel.initialize import NoCudaError
    from moepp_megatron.training.checkpointing import CheckpointError
    from moepp_megatron.training.run_dir import RunDirLockedError
    from moepp_megatron.training.trainer import NonFiniteLossError, NonFiniteWeightsError

    return (CheckpointError, DataFileError, NoCudaError, RunDirLockedError, NonFiniteLossError,
            NonFiniteWeightsError)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", required=True, action="append",
        help="run config YAML (see configs/); repeat to layer files, later ones win",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    from moepp_megatron.training.run_dir import stop_when_orphaned
    from moepp_megatron.training.trainer import Trainer

    # torchrun starts workers in sessions of their own: stop when it is gone.
    stop_when_orphaned(lambda: os.kill(os.getpid(), signal.SIGTERM))
    trainer = Trainer(config)
    trainer.metrics.print("resolved config:\n" + yaml.safe_dump(trainer.resolved_config, sort_keys=False))
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
