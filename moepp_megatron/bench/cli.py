"""``moepp-bench``: run a benchmark, write its record, rebuild the README tables.

    moepp-bench layer    [--models 0.6B,1B,2B,7B] [--taus ...] [--tokens N]
    moepp-bench overhead [--models ...] [--tokens N] [--compile off,on]
    moepp-bench comm     [--model 0.6B] [--ep 2,4] [--tokens N]
    moepp-bench train    [--model 0.6B] [--micro-batch B] [--seq-length S] [--microbatches M]
                         [--routing balanced|init]
    moepp-bench costs    [--runs moepp-0.6b-tau0.75,...] [--micro-batch B] [--seq-length S]
                         (per-layer costs of the paper runs: moepp-train --dry-run's step time)
    moepp-bench startup  [--repeats 3]  (start-up time of every command, fresh processes)
    moepp-bench report   [--readme README.md]
    moepp-bench all      (every benchmark with its defaults, then report)

Defaults are sized for the device: small token counts on CPU, realistic ones on a GPU.
``--set model.moe.grouped_gemm=true`` (any dotted model override) applies to every model.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from moepp_megatron.bench.presets import PAPER_RUNS, PRESETS, TAUS
from moepp_megatron.bench.records import repo_default, write_record
from moepp_megatron.bench.report import update_readme
from moepp_megatron.known_warnings import ignore_known_warnings

# (CPU, GPU) defaults.
DEFAULTS = {
    "layer_tokens": (2048, 16384),
    "warmup": (1, 5),
    "repeats": (5, 20),
    "micro_batch": (1, 4),
    "seq_length": (256, 2048),
    "microbatches": (1, 8),
    "train_warmup": (1, 3),
    "train_repeats": (3, 10),
}
# Per command: argument -> its DEFAULTS entry (used when the argument is not given).
DEFAULT_KEYS = {
    "layer": {"tokens": "layer_tokens", "warmup": "warmup", "repeats": "repeats"},
    "overhead": {"tokens": "layer_tokens", "warmup": "warmup", "repeats": "repeats"},
    "comm": {},
    "costs": {"warmup": "train_warmup", "repeats": "train_repeats"},
    "train": {"micro_batch": "micro_batch", "seq_length": "seq_length", "microbatches": "microbatches",
              "warmup": "train_warmup", "repeats": "train_repeats"},
}


def _csv(cast):
    return lambda text: [cast(item) for item in text.split(",") if item]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moepp-bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, timed=True):
        p.add_argument("--results-dir", type=Path, **repo_default("bench/results"))
        p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dotted model overrides, e.g. model.moe.grouped_gemm=true")
        if timed:
            p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
            p.add_argument("--threads", type=int, default=1,
                           help="torch intra-op threads on CPU (CPU timings are process CPU time)")
            p.add_argument("--warmup", type=int)
            p.add_argument("--repeats", type=int)

    p = sub.add_parser("layer", help="one MoE++ layer vs one vanilla MoE layer")
    common(p)
    p.add_argument("--models", type=_csv(str), default=list(PRESETS))
    p.add_argument("--taus", type=_csv(float), default=list(TAUS))
    p.add_argument("--tokens", type=int, help="tokens per step (default 2048 on CPU, 16384 on GPU)")

    p = sub.add_parser("overhead", help="share of routing and ZC experts in the MoE++ layer time")
    common(p)
    p.add_argument("--models", type=_csv(str), default=list(PRESETS))
    p.add_argument("--tokens", type=int)
    p.add_argument("--compile", type=_csv(lambda s: {"off": False, "on": True}[s]), default=[False, True],
                   help="routing modes to time: off (eager), on (torch.compile)")

    p = sub.add_parser("comm", help="dispatcher bytes per step at EP=2, 4 (CPU, gloo)")
    common(p, timed=False)
    p.add_argument("--model", default="0.6B", choices=list(PRESETS))
    p.add_argument("--ep", type=_csv(int), default=[2, 4])
    p.add_argument("--taus", type=_csv(float), default=list(TAUS))
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")

    p = sub.add_parser("train", help="tokens/s, peak memory and MFU of full training steps")
    common(p)
    p.add_argument("--model", default="0.6B", choices=list(PRESETS))
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--microbatches", type=int)
    p.add_argument("--routing", choices=("balanced", "init"), default="balanced",
                   help="balanced: every layer at its loss's balance (tau for MoE++); init: fresh routers")

    p = sub.add_parser("costs", help="per-layer training costs of the paper runs (for the step-time estimate)")
    common(p)
    p.add_argument("--runs", type=_csv(str), default=list(PAPER_RUNS), help="paper runs (scripts/slurm/paper_runs.sh)")
    p.add_argument("--micro-batch", type=int, help="instead of the run's recipe (e.g. small, on CPU)")
    p.add_argument("--seq-length", type=int, help="instead of the run's recipe")

    p = sub.add_parser("startup", help="seconds until each command's --help and first error")
    p.add_argument("--results-dir", type=Path, **repo_default("bench/results"))
    p.add_argument("--repeats", type=int, default=3)

    p = sub.add_parser("all", help="every benchmark with its defaults, then report")
    common(p)
    p.add_argument("--readme", type=Path, **repo_default("README.md"))

    p = sub.add_parser("report", help="rebuild README.md's Performance tables from the latest records")
    p.add_argument("--results-dir", type=Path, **repo_default("bench/results"))
    p.add_argument("--readme", type=Path, **repo_default("README.md"))
    return parser


def _initialize(device) -> None:
    from moepp_megatron.parallel.initialize import initialize_parallel

    initialize_parallel(cpu_mode=device.type == "cpu")


def _config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "results_dir"}


def _save(benchmark: str, device, config: dict, results: list[dict], args: argparse.Namespace) -> None:
    print(f"wrote {write_record(benchmark, device, config, results, args.results_dir)}")


def run_all(args: argparse.Namespace) -> None:
    shared = ["--results-dir", str(args.results_dir), "--set", *args.overrides]
    timing = ["--device", args.device, "--threads", str(args.threads)]
    timing += [f"--{name}={value}" for name in ("warmup", "repeats") if (value := getattr(args, name)) is not None]
    for command in ("layer", "overhead", "train", "costs"):
        main([command, *timing, *shared])
    main(["comm", *shared])
    main(["report", "--results-dir", str(args.results_dir), "--readme", str(args.readme)])


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    ignore_known_warnings()
    if args.command == "all":
        run_all(args)
        return
    if args.command == "report":
        update_readme(args.readme, args.results_dir)
        print(f"updated {args.readme} from {args.results_dir}")
        return
    # The benchmarks import torch and megatron-core: only once there is something to run.
    import torch

    from moepp_megatron.bench import comm, costs, expert_layer, layer, overhead, startup, train
    from moepp_megatron.bench.measure import clock_name, resolve_device

    if args.command == "startup":
        _save("startup", torch.device("cpu"), {"repeats": args.repeats}, startup.bench(args.repeats), args)
        return
    device = resolve_device(getattr(args, "device", "cpu"))
    gpu = device.type == "cuda"
    if not gpu and hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    for name, key in DEFAULT_KEYS[args.command].items():
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[key][gpu])
    if args.command == "train":
        args.overrides = [*args.overrides, f"model.seq_length={args.seq_length}"]
    if args.command == "costs":
        _initialize(device)
        results = costs.bench(args.runs, args.overrides, args.micro_batch, args.seq_length, device,
                              args.warmup, args.repeats)
        config = {**_config(args), "clock": clock_name(device),
                  "resolved_models": {row["run"]: row["model"] for row in results}}
        _save("costs", device, config, results, args)
        return
    models = [args.model] if hasattr(args, "model") else args.models
    config = _config(args)
    if args.command != "comm":
        config["clock"] = clock_name(device)
    config["resolved_models"] = {
        name: dataclasses.asdict(expert_layer.preset_model(name, args.overrides)) for name in models
    }

    if args.command in ("layer", "overhead"):
        # One layer at a time in this process (world size 1).
        _initialize(device)
        timing = (device, args.warmup, args.repeats)
        variant = args.taus if args.command == "layer" else args.compile
        bench_model = layer.bench_model if args.command == "layer" else overhead.bench_model
        results = [
            row for name in args.models
            for row in bench_model(name, args.overrides, variant, args.tokens, *timing)
        ]
    elif args.command == "comm":
        model = expert_layer.preset_model(args.model, args.overrides)
        results = [row for ep in args.ep for row in comm.bench(model, ep, args.tokens, args.taus)]
    else:
        moepp = expert_layer.preset_model(args.model, args.overrides)
        methods = {"moepp": moepp, "vanilla": expert_layer.with_moe(moepp, method="vanilla")}
        results = train.bench(
            args.model, methods, device.type, args.threads, args.micro_batch, args.microbatches,
            args.warmup, args.repeats, args.routing,
        )
    _save(args.command, device, config, results, args)
