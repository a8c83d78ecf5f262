"""``moepp-study``: MoE++ vs vanilla MoE at small scale, rerunnable on a CPU.

    moepp-study               # main comparison (configs/study/main.yaml)
    moepp-study --ablations   # tau, gating residuals, ZC sets, dropless (ablations.yaml)
    moepp-study --quick       # a few minutes, for CI (quick.yaml)
    moepp-study --gpu         # a GPU-sized model (gpu.yaml)
    moepp-study --config FILE # any study config
    moepp-study report        # README's "Small-scale evidence" table and plots

Runs live under ``--work-dir`` (default runs/study), the corpus there too (built once);
each study writes one record to bench/results/ and then refreshes the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moepp_megatron.bench.records import repo_default
from moepp_megatron.config.packaged import CONFIGS_DIR
from moepp_megatron.known_warnings import ignore_known_warnings
from moepp_megatron.study import report

STUDY_CONFIGS = CONFIGS_DIR / "study"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moepp-study", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "report"), default="run")
    which = parser.add_mutually_exclusive_group()
    for name in ("ablations", "quick", "gpu"):
        which.add_argument(f"--{name}", action="store_const", const=STUDY_CONFIGS / f"{name}.yaml", dest="config")
    which.add_argument("--config", type=Path)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/study"))
    parser.add_argument("--results-dir", type=Path, **repo_default("bench/results"))
    parser.add_argument("--readme", type=Path, **repo_default("README.md"))
    parser.add_argument("--plot-dir", type=Path, **repo_default("bench/study"))
    args = parser.parse_args(argv)
    ignore_known_warnings()
    if args.command == "run":
        from moepp_megatron.study.runner import run_study  # torch and megatron-core: only to run

        run_study(args.config or STUDY_CONFIGS / "main.yaml", args.work_dir, args.results_dir)
    report.update_readme(args.readme, args.results_dir, args.plot_dir)
    print(f"updated {args.readme} and the plots in {args.plot_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
