"""The GPU check: everything only a GPU can show, in one command of at most 8 minutes.

    python -m moepp_megatron.bench.gpu_check prepare          # on a CPU machine with network
    python -m moepp_megatron.bench.gpu_check run [--out DIR]  # on the GPU (scripts/gpu_check.sh)
    python -m moepp_megatron.bench.gpu_check run --cpu-dry-run --results-dir D --readme R

``prepare`` downloads the pinned wheels that a GPU image with Python 3.12 and a CUDA torch
lacks (:data:`WHEELS`) into ``.whl/``; scripts/gpu_check.sh installs them offline with
``pip --no-index`` into a target directory before calling ``run``.

``run`` executes the stages in order of value, each in its own process under its own time
limit (and never past the check's total), and writes each record the moment it exists, so a
hang in one stage keeps the records of the stages before it:

1. ``tests``: ``pytest -m gpu tests/gpu`` (bf16 layer and model vs the reference, sync-free
   routing, grouped GEMM, compiled routing, one-GPU training with exact resume and HF export);
   the per-test outcomes become a ``gpu-tests`` record.
2. ``costs``: per-layer training costs of the paper runs (what ``moepp-train --dry-run``
   and README's paper-run table turn into step times on 4 x 8 A100).
3. ``layer`` (paper shapes, bf16, grouped GEMM, every tau) and ``overhead`` (compile on).
4. ``train``: the 0.6B preset, MoE++ vs vanilla, on one GPU.
5. ``report``: README's generated tables from the new records.

A ``gpu-check`` summary (each stage's exit code, time, and the tail of its output) is
rewritten after every stage. With ``--out`` every record, the summary, the full log and the
README are also copied there as they appear. ``--cpu-dry-run`` runs the same sequence on CPU
at tiny shapes (CI runs it), so the check cannot rot between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

import torch

from moepp_megatron.bench.records import (
    REPO_ROOT,
    new_record,
    new_record_path,
    repo_default,
    save_record,
    write_record,
)

# What the GPU image (Python 3.12, CUDA torch, transformers, safetensors, sentencepiece,
# pytest, pyyaml, psutil, numpy) lacks: megatron-core, cp312 build for x86_64 Linux.
WHEELS = ("megatron-core==0.16.1",)
WHEEL_DIR = REPO_ROOT / ".whl"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# The whole check on a GPU; stages get what is left when their own limit would overrun it.
GPU_BUDGET_S = 460
TINY = ["--set", "model.hidden_size=32", "model.moe.ffn_hidden_size=64", "model.num_layers=2",
        "model.num_attention_heads=4", "model.head_dim=8"]
DRY_TIMING = ["--device", "cpu", "--warmup", "0", "--repeats", "1"]


@dataclasses.dataclass
class Stage:
    name: str
    bench_args: list[str]  # moepp-bench arguments; empty for the pytest stage
    limit_s: int  # on a GPU
    dry_args: list[str] = dataclasses.field(default_factory=list)
    dry_limit_s: int = 600


STAGES = [
    Stage("tests", [], 160, dry_limit_s=900),
    # The runs as their configs are (no overrides): their dry runs look the costs up by model.
    Stage("costs", ["costs", "--warmup", "2", "--repeats", "5"], 70,
          ["costs", "--runs", "moepp-0.6b-tau0.75", "--micro-batch", "1", "--seq-length", "32", *DRY_TIMING,
           *TINY]),
    Stage("layer", ["layer", "--models", "0.6B,1B,2B,7B", "--warmup", "3", "--repeats", "10",
                    "--set", "model.moe.grouped_gemm=true"], 100,
          ["layer", "--models", "0.6B", "--taus", "0.5,1.0", "--tokens", "64", *DRY_TIMING, *TINY,
           "model.moe.grouped_gemm=true"]),
    Stage("overhead", ["overhead", "--models", "0.6B,7B", "--compile", "on"], 40,
          ["overhead", "--models", "0.6B", "--compile", "on", "--tokens", "64", *DRY_TIMING, *TINY]),
    Stage("train", ["train", "--model", "0.6B"], 70,
          ["train", "--model", "0.6B", "--micro-batch", "1", "--seq-length", "32", "--microbatches", "1",
           *DRY_TIMING, *TINY]),
    Stage("report", ["report"], 20, ["report"]),
]


def prepare(wheel_dir: Path = WHEEL_DIR) -> list[Path]:
    """Download :data:`WHEELS` for CPython 3.12 on x86_64 Linux into ``wheel_dir``."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(wheel_dir), *WHEELS],
        check=True,
    )
    wheels = sorted(wheel_dir.glob("*.whl"))
    print("wheels for the GPU check:\n" + "\n".join(f"  {w.name} ({w.stat().st_size / 2**20:.1f} MiB)" for w in wheels))
    return wheels


class Check:
    """Runs the stages and keeps the summary and the copies in ``out`` up to date."""

    def __init__(self, dry_run: bool, results_dir: Path, readme: Path, out: Optional[Path]) -> None:
        self.dry_run, self.results_dir, self.readme, self.out = dry_run, results_dir, readme, out
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.started = time.monotonic()
        self.stages: list[dict] = []
        config = {"dry_run": dry_run, "budget_s": GPU_BUDGET_S, "stages": [s.name for s in STAGES]}
        self.summary = new_record("gpu-check", self.device, config, self.stages)
        self.summary_path = new_record_path(self.summary, results_dir)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        self.log = (out or results_dir) / "gpu_check.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")

    def run(self) -> bool:
        for stage in STAGES:
            limit = stage.dry_limit_s if self.dry_run else min(stage.limit_s, self._budget_left())
            if limit <= 0:
                self._record(stage.name, None, 0.0, False, "skipped: the check's time budget is spent")
                continue
            before = set(self.results_dir.glob("*.json"))
            rc, seconds, timed_out, output = self._execute(stage, limit)
            if stage.name == "tests":
                self._write_tests_record(rc, timed_out)
            self._record(stage.name, rc, seconds, timed_out, output[-4000:])
            self._copy_out(sorted(set(self.results_dir.glob("*.json")) - before - {self.summary_path}))
        if self.out is not None and self.readme.exists():
            shutil.copy(self.readme, self.out / "README.md")
        return all(s["rc"] == 0 for s in self.stages)

    def _budget_left(self) -> int:
        return int(GPU_BUDGET_S - (time.monotonic() - self.started))

    def _command(self, stage: Stage) -> tuple[list[str], dict]:
        env = dict(os.environ)
        if stage.name == "tests":
            self.junit = self.results_dir / ".gpu_tests_junit.xml"
            if self.dry_run:
                env["MOEPP_GPU_TESTS_ON_CPU"] = "1"
            return [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rA", "-p", "no:cacheprovider",
                    f"--junitxml={self.junit}"], env
        args = stage.dry_args if self.dry_run else stage.bench_args
        where = ["--readme", str(self.readme)] if stage.name == "report" else []
        return [sys.executable, "-m", "moepp_megatron.bench", *args, "--results-dir", str(self.results_dir), *where], env

    def _execute(self, stage: Stage, limit: int) -> tuple[Optional[int], float, bool, str]:
        command, env = self._command(stage)
        print(f"[gpu-check] {stage.name}: {' '.join(command)} (limit {limit} s)", flush=True)
        start = time.monotonic()
        # Own session, so a timeout kills the stage with every process it started.
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            output, _ = process.communicate()
            timed_out = True
        seconds = time.monotonic() - start
        with self.log.open("a") as log:
            log.write(f"===== {stage.name} ({seconds:.0f} s, rc {process.returncode}) =====\n{output}\n")
        status = "timed out" if timed_out else f"rc {process.returncode}"
        print(f"[gpu-check] {stage.name}: {status} after {seconds:.0f} s", flush=True)
        return (None if timed_out else process.returncode), seconds, timed_out, output

    def _write_tests_record(self, rc: Optional[int], timed_out: bool) -> None:
        tests = _junit_results(self.junit) if self.junit.exists() else []
        config = {"command": "pytest -m gpu tests/gpu", "dry_run": self.dry_run, "rc": rc, "timed_out": timed_out}
        write_record("gpu-tests", self.device, config, tests, self.results_dir)
        self.junit.unlink(missing_ok=True)

    def _record(self, name: str, rc, seconds: float, timed_out: bool, tail: str) -> None:
        self.stages.append({"stage": name, "rc": rc, "seconds": round(seconds, 1), "timed_out": timed_out,
                            "output_tail": tail})
        save_record(self.summary, self.summary_path)
        self._copy_out([self.summary_path, self.log])

    def _copy_out(self, paths) -> None:
        if self.out is None:
            return
        for path in paths:
            if path.resolve() != (self.out / path.name).resolve():
                shutil.copy(path, self.out / path.name)


def _junit_results(path: Path) -> list[dict]:
    results = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (element.get("message") or "")[:2000]
        results.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                        "seconds": float(case.get("time", 0)), "message": message})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download the pinned wheels the GPU image lacks into .whl/")
    p.add_argument("--wheel-dir", type=Path, default=WHEEL_DIR)
    p = sub.add_parser("run", help="run the stages (on a GPU, or --cpu-dry-run)")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same stages on CPU at tiny shapes")
    p.add_argument("--results-dir", type=Path, **repo_default("bench/results"))
    p.add_argument("--readme", type=Path, **repo_default("README.md"))
    p.add_argument("--out", type=Path, help="also copy every record, the log and README here as they appear")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.wheel_dir)
        return 0
    if not args.cpu_dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU, or pass --cpu-dry-run")
    check = Check(args.cpu_dry_run, args.results_dir, args.readme, args.out)
    ok = check.run()
    print(json.dumps([{k: v for k, v in s.items() if k != "output_tail"} for s in check.stages], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
