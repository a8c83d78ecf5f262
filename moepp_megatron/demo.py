"""The embedded default job: an offline, end-to-end MoE++ pretraining demo on CPU.

1. builds a corpus of three sources from text every CPython ships (no downloads);
2. trains a small sentencepiece tokenizer and preprocesses each source into a Megatron
   indexed dataset, blended 50/30/20;
3. pretrains the tiny MoE++ model (configs/demo-cpu.yaml) with expert parallelism 2 on 2
   processes, with validation and checkpoints, stops half-way, resumes from the
   checkpoint, and finishes;
4. prints a summary: loss curve start/end, routing statistics, where things are.

    moepp-demo                          # a few minutes on 2 CPU cores
    moepp-demo --steps 100 model.moe.tau=0.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from moepp_megatron.config.packaged import CONFIGS_DIR
from moepp_megatron.known_warnings import ignore_known_warnings
from moepp_megatron.training.metrics import read_metrics

CONFIG = CONFIGS_DIR / "demo-cpu.yaml"
BLEND = {"reference": 0.5, "library": 0.3, "builtins": 0.2}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="data and run directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return parser.parse_args(argv)


def prepare_data(data_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    """Tokenizer and mixture file; reused when already there."""
    from moepp_megatron.data.local_corpus import python_docs_corpus
    from moepp_megatron.data.preprocess import preprocess
    from moepp_megatron.data.train_tokenizer import train_sentencepiece

    tokenizer = data_dir / "tokenizer.model"
    mixture = data_dir / "mixture.yaml"
    if tokenizer.is_file() and mixture.is_file():
        return tokenizer, mixture
    corpus = python_docs_corpus()
    train_sentencepiece([doc for docs in corpus.values() for doc in docs], tokenizer, vocab_size)
    sources = []
    for name, documents in corpus.items():
        raw = data_dir / f"{name}.jsonl"
        raw.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
        summary = preprocess([str(raw)], data_dir / name, tokenizer)
        print(f"  {name}: {summary.documents} documents, {summary.tokens:,} tokens, weight {BLEND[name]}")
        sources.append({"prefix": str((data_dir / name).resolve()), "weight": BLEND[name]})
    mixture.write_text(yaml.safe_dump({"sources": sources}))
    return tokenizer, mixture


def config_problem(overrides: list[str], nproc: int) -> str | None:
    """What ``moepp-train --check`` would say, checked in this process (megatron is imported
    already): a mistake in the overrides is one message, before torchrun starts anything."""
    from moepp_megatron.config import load_config
    from moepp_megatron.training.plan import plan_run

    try:
        plan_run(load_config(CONFIG, overrides), nproc)
    except (OSError, ValueError) as e:  # ConfigError and the data errors are ValueErrors
        return str(e)
    return None


def train(nproc: int, overrides: list[str]) -> str:
    """Run moepp-train under torchrun; its outcome: "complete", "stopped" (a checkpoint to
    resume from) or "failed" (the trainer reports it as scripts/pretrain.sh reads it)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "moepp_megatron.training.train", "--config", str(CONFIG), *overrides,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "status"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEPP_STATUS_FILE": str(status)}
        code = subprocess.run(command, env=env).returncode
        outcome = status.read_text().strip() if status.is_file() else ""
    return outcome if code == 0 and outcome else "failed"


def summarize(run_dir: Path, seconds: float) -> None:
    records = read_metrics(run_dir)
    train = [r for r in records if "lm_loss" in r]
    valid = [(r["iteration"], r["valid"]["lm_loss"]) for r in records if "valid" in r]
    last = train[-1]
    print("\n=== MoE++ demo summary ===")
    print(f"wall time            {seconds:.0f} s")
    print(f"train lm loss        {train[0]['lm_loss']:.3f} (iteration {train[0]['iteration']}) -> "
          f"{last['lm_loss']:.3f} (iteration {last['iteration']})")
    print("validation lm loss   " + ", ".join(f"{v:.3f} @ {i}" for i, v in valid))
    print(f"routing at iteration {last['iteration']}: picked = what the router chose, "
          f"kept = what ran after the capacity limit")
    for layer, stats in last["routing"].items():
        print(f"{layer:8s} picked {_routing_summary(stats['picked'])}")
        print(f"{'':8s} kept   {_routing_summary(stats['kept'])} | dropped {stats['dropped_fraction']:.1%}")
    print(f"checkpoints          {run_dir / 'checkpoints'}")
    print(f"metrics              {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'}; "
          f"plots: moepp-plot {run_dir})")


def _routing_summary(shares: dict) -> str:
    zc = ", ".join(f"{kind} {share:.0%}" for kind, share in shares["zc_share"].items())
    return (f"{shares['ffn_experts_per_token']:.2f} FFN experts/token | ZC slots: {zc or 'none'} | "
            f"FFN load max/mean {shares['ffn_load_imbalance']:.2f}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ignore_known_warnings()
    workdir = Path(args.workdir).resolve()
    run_dir = workdir / "run"
    start = time.monotonic()
    print(f"[1/3] building an offline corpus and tokenizer in {workdir / 'data'}")
    tokenizer, mixture = prepare_data(workdir / "data", args.vocab_size)
    overrides = [
        f"run_dir={run_dir}", f"data.tokenizer_model={tokenizer}", f"data.mixture={mixture}",
        # The preset's warmup (20 of 300 steps) scaled to --steps.
        f"training.train_iters={args.steps}", f"optim.warmup_iters={max(1, args.steps // 15)}",
        *args.overrides,
    ]
    problem = config_problem(overrides, args.nproc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    half = args.steps // 2
    print(f"[2/3] pretraining on {args.nproc} processes; stopping after {half} iterations")
    if train(args.nproc, [*overrides, f"training.exit_after_iters={half}"]) != "stopped":
        return 1
    print("[3/3] resuming from the checkpoint to the end")
    if train(args.nproc, overrides) != "complete":
        return 1
    summarize(run_dir, time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
