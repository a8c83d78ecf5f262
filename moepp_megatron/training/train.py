"""``moepp-train --config PATH [--config PATH ...] [dotted.key=value ...]``: pretraining,
launched by torchrun (see scripts/pretrain.sh), e.g.

    moepp-train --config configs/moepp-0.6b-8+4e.yaml --config configs/recipes/strategy1.yaml \
        data.root=/data/moepp run_dir=/runs/moepp-0.6b

Prints the resolved config, trains (resuming from the run directory's latest checkpoint
when there is one) and exits 0 when done, 75 when stopped by SIGTERM / SIGUSR1 after
saving a checkpoint (run it again to continue).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from moepp_megatron.config import load_config, to_dict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", required=True, action="append",
        help="run config YAML (see configs/); repeat to layer files, later ones win",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    from moepp_megatron.training.trainer import Trainer

    trainer = Trainer(config)
    trainer.metrics.print("resolved config:\n" + yaml.safe_dump(trainer.resolved_config, sort_keys=False))
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
