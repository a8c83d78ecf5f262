"""Runs a study: every (variant, seed) as one ``moepp-train`` process on the same corpus,
the same tokens in the same order, then one JSON record with every curve and statistic.

A run's directory is named by its variant, seed and a hash of its full override list, so
studies share identical runs (the ablations reuse the main study's vanilla and MoE++ runs
of seed 1) and a run whose directory holds ``done.json`` is not run again: an interrupted
study picks up where it stopped (an unfinished run resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moepp_megatron.bench.records import write_record
from moepp_megatron.config.loader import load_config
from moepp_megatron.config.packaged import find_config
from moepp_megatron.parallel.ports import free_port
from moepp_megatron.study.config import StudyConfig
from moepp_megatron.study.corpus import Corpus, build_corpus
from moepp_megatron.training.metrics import read_metrics

DONE = "done.json"
# Routing statistics are averaged over the logged records of the last quarter of training.
FINAL_SHARE = 0.25


@dataclasses.dataclass
class Run:
    variant: str
    seed: int
    run_dir: Path
    overrides: list[str]


def plan(study: StudyConfig, config_dir: Path, corpus: Corpus, work_dir: Path) -> list[Run]:
    data = [
        f"data.tokenizer_model={corpus.tokenizer}",
        "data.sources=" + json.dumps([{"prefix": p, "weight": corpus.manifest["sources"][s]["tokens"]}
                                      for s, p in corpus.train.items()]),
        "data.valid_sources=" + json.dumps([{"prefix": corpus.valid}]),
        f"data.seed={study.data_seed}",
    ]
    runs = []
    for variant in study.variants:
        for seed in study.seeds:
            overrides = [*data, *study.overrides, *variant.overrides, f"seed={seed}"]
            digest = hashlib.sha256("\n".join([study.run_config, *overrides]).encode()).hexdigest()[:8]
            run_dir = work_dir / "runs" / f"{variant.name}-s{seed}-{digest}"
            runs.append(Run(variant.name, seed, run_dir, [*overrides, f"run_dir={run_dir}"]))
    # Fail on a bad override before the first run starts.
    for run in runs:
        load_config(config_dir / study.run_config, run.overrides)
    return runs



def _launch(run: Run, config_path: Path, threads: int) -> subprocess.Popen:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "moepp_megatron.training.train", "--config", str(config_path), *run.overrides]
    log = open(run.run_dir / "train.log", "a")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def execute(study: StudyConfig, runs: list[Run], config_path: Path) -> None:
    """Runs what is not done yet, ``parallel_runs`` at a time; fails on the first failure."""
    pending = [r for r in runs if not (r.run_dir / DONE).is_file()]
    print(f"study {study.name}: {len(runs)} runs, {len(runs) - len(pending)} already done", flush=True)
    active: list[tuple[Run, subprocess.Popen, float]] = []
    while pending or active:
        while pending and len(active) < study.parallel_runs:
            run = pending.pop(0)
            print(f"  start {run.variant} seed {run.seed} -> {run.run_dir}", flush=True)
            active.append((run, _launch(run, config_path, study.threads_per_run), time.monotonic()))
        time.sleep(1.0)
        for item in list(active):
            run, process, started = item
            if process.poll() is None:
                continue
            active.remove(item)
            if process.returncode != 0:
                for _, other, _ in active:
                    other.terminate()
                raise RuntimeError(f"{run.variant} seed {run.seed} failed (exit {process.returncode}); "
                                   f"see {run.run_dir / 'train.log'}")
            minutes = (time.monotonic() - started) / 60
            (run.run_dir / DONE).write_text(json.dumps({"minutes": minutes}) + "\n")
            print(f"  done  {run.variant} seed {run.seed} ({minutes:.1f} min)", flush=True)


def data_fingerprint(run_dir: Path) -> str:
    """SHA-256 over megatron's sample-order index files of the run (document, sample and
    shuffle indices of every split and the blend's dataset indices): equal fingerprints
    mean the runs read the same tokens in the same order."""
    digest = hashlib.sha256()
    for path in sorted((run_dir / "data_cache").rglob("*.npy"), key=lambda p: p.name):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def summarise(run: Run, tokens_per_step: int) -> dict:
    """Curves and statistics of a finished run, from its metrics.jsonl."""
    records = read_metrics(run.run_dir)
    train = [r for r in records if "lm_loss" in r and "valid" not in r]
    valid = [r for r in records if "valid" in r]
    last = train[-max(1, int(len(train) * FINAL_SHARE)):]
    routing = {layer: _mean([r["routing"][layer] for r in last]) for layer in last[0].get("routing", {})}
    step_times = [r["step_cpu_time_s"] for r in train[len(train) // 10:]]
    final = valid[-1]["valid"]
    return {
        "variant": run.variant,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "data_fingerprint": data_fingerprint(run.run_dir),
        "train_curve": [[r["iteration"], r["consumed_tokens"], r["lm_loss"]] for r in train],
        "valid_curve": [[r["iteration"], r["iteration"] * tokens_per_step, r["valid"]["lm_loss"],
                         r["valid"].get("lm_loss_dropless")] for r in valid],
        "final_valid_loss": final["lm_loss"],
        "final_valid_loss_dropless": final.get("lm_loss_dropless"),
        "routing": routing,
        "ffn_experts_per_token": statistics.fmean(v["kept"]["ffn_experts_per_token"] for v in routing.values()),
        "picked_ffn_experts_per_token": statistics.fmean(
            v["picked"]["ffn_experts_per_token"] for v in routing.values()),
        "dropped_fraction": statistics.fmean(v["dropped_fraction"] for v in routing.values()),
        "step_cpu_time_s": statistics.median(step_times),
        "tokens": train[-1]["consumed_tokens"],
    }


def _mean(trees: list):
    """Element-wise mean of equally shaped nests of dicts, lists and numbers."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _mean([tree[key] for tree in trees]) for key in first}
    if isinstance(first, list):
        return [_mean(list(column)) for column in zip(*trees)]
    return statistics.fmean(trees)


def with_ratios(results: list[dict], reference: str) -> list[dict]:
    """Expert compute and step time relative to the reference variant of the same seed."""
    by_seed = {r["seed"]: r for r in results if r["variant"] == reference}
    for r in results:
        ref = by_seed[r["seed"]]
        r["expert_compute_ratio"] = r["ffn_experts_per_token"] / ref["ffn_experts_per_token"]
        r["step_time_ratio"] = r["step_cpu_time_s"] / ref["step_cpu_time_s"]
    return results


def run_study(config_path: Path, work_dir: Path, results_dir: Path) -> Path:
    from moepp_megatron.config.loader import load_typed

    config_path = find_config(config_path)  # its run_config is next to it, also when packaged
    study = load_typed(StudyConfig, config_path)
    started = time.monotonic()
    corpus = build_corpus(study.corpus, work_dir / f"corpus-{study.corpus}")
    run_config = config_path.parent / study.run_config
    runs = plan(study, config_path.parent, corpus, work_dir)
    execute(study, runs, run_config)
    resolved = {f"{r.variant}-s{r.seed}": load_config(run_config, r.overrides) for r in runs}
    results = with_ratios(
        [summarise(run, resolved[f"{run.variant}-s{run.seed}"].training.global_batch_tokens) for run in runs],
        study.reference,
    )
    first = next(iter(resolved.values()))
    device = torch.device("cpu" if first.parallel.cpu_mode else "cuda")
    config = {"study": dataclasses.asdict(study), "config_file": str(config_path), "corpus": corpus.manifest,
              "resolved_runs": {name: dataclasses.asdict(c) for name, c in resolved.items()}, "minutes": (time.monotonic() - started) / 60,
              "threads_per_run": study.threads_per_run}
    path = write_record(f"study-{study.name}", device, config, results, results_dir)
    print(f"wrote {path}")
    return path
