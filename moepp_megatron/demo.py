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
import time
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-cpu.yaml"
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


def train(nproc: int, overrides: list[str]) -> int:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "moepp_megatron.training.train", "--config", str(CONFIG), *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, env=env).returncode


def summarize(run_dir: Path, seconds: float) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "lm_loss" in r]
    valid = [(r["iteration"], r["valid"]["lm_loss"]) for r in records if "valid" in r]
    last = train[-1]
    print("\n=== MoE++ demo summary ===")
    print(f"wall time            {seconds:.0f} s")
    print(f"train lm loss        {train[0]['lm_loss']:.3f} (iteration {train[0]['iteration']}) -> "
          f"{last['lm_loss']:.3f} (iteration {last['iteration']})")
    print("validation lm loss   " + ", ".join(f"{v:.3f} @ {i}" for i, v in valid))
    for layer, stats in last["routing"].items():
        zc = ", ".join(f"{kind} {share:.0%}" for kind, share in stats["zc_share"].items())
        print(f"{layer:20s} {stats['ffn_experts_per_token']:.2f} FFN experts/token | ZC slots: {zc} | "
              f"FFN load max/mean {stats['ffn_load_imbalance']:.2f} | dropped {stats['dropped_fraction']:.1%}")
    print(f"checkpoints          {run_dir / 'checkpoints'}")
    print(f"metrics              {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path(args.workdir).resolve()
    run_dir = workdir / "run"
    start = time.monotonic()
    print(f"[1/3] building an offline corpus and tokenizer in {workdir / 'data'}")
    tokenizer, mixture = prepare_data(workdir / "data", args.vocab_size)
    overrides = [
        f"run_dir={run_dir}", f"data.tokenizer_model={tokenizer}", f"data.mixture={mixture}",
        f"training.train_iters={args.steps}", *args.overrides,
    ]
    half = args.steps // 2
    print(f"[2/3] pretraining on {args.nproc} processes; stopping after {half} iterations")
    code = train(args.nproc, [*overrides, f"training.exit_after_iters={half}"])
    if code != 0:
        return code
    print("[3/3] resuming from the checkpoint to the end")
    code = train(args.nproc, overrides)
    if code == 0:
        summarize(run_dir, time.monotonic() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
