"""scripts/slurm/paper_runs.sh: every run of the paper, with the configs and overrides that
resolve to the paper's recipe (docs/MOEPP_SPEC.md section 3, checked through the real config
loader), and submissions that a real Slurm accepts with the right dependencies."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from moepp_megatron.config import load_config
from tests.slurm.conftest import REPO

LAUNCHER = REPO / "scripts/slurm/paper_runs.sh"
SIZES = {"0.6b": (8, 2), "1b": (16, 2), "2b": (32, 6)}  # N_ffn, constant experts
TAUS = ("0.10", "0.25", "0.50", "0.75", "1.00")
PAPER_RUNS = [run for s in SIZES for run in [f"moepp-{s}-tau{t}" for t in TAUS] + [f"vanilla-{s}"]]
PAPER_RUNS += ["moepp-7b-s2", "moepp-7b-s3"]
GPUS = 32  # 4 nodes x 8 A100


def launcher(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHER), *args], env={**os.environ, **(env or {})},
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=check)


def resolve_run_module():
    spec = importlib.util.spec_from_file_location("resolve_run", REPO / "scripts/slurm/resolve_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path: Path, *names: str) -> dict[str, tuple[dict, list[str], list[str]]]:
    """run -> (environment, sbatch options, pretrain.sbatch arguments)."""
    env = {"DATA_ROOT": "/data/moepp", "TOKENIZER": "/data/llama2/tokenizer.model",
           "RUNS_ROOT": str(tmp_path / "runs")}
    out = launcher("--dry-run", *names, env=env).stdout
    commands = {}
    run = None
    for line in out.splitlines():
        if line.startswith("# "):
            run = line[2:].split(":")[0]
            continue
        words = shlex.split(line)
        environment = {}
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            environment[key] = value
        script = next(i for i, w in enumerate(words) if w.endswith("pretrain.sbatch"))
        commands[run] = (environment, words[:script], words[script + 1:])
    return commands


def test_list_names_every_paper_run():
    out = launcher("--list").stdout
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert listed == PAPER_RUNS


def test_unknown_run_and_missing_data_are_refused():
    assert launcher("moepp-3b-tau0.75", "--dry-run", check=False).returncode == 2
    result = launcher("moepp-0.6b-tau0.75", check=False, env={"DATA_ROOT": "", "TOKENIZER": ""})
    assert result.returncode == 2 and "set DATA_ROOT" in result.stderr


def test_every_run_resolves_to_the_paper_recipe(tmp_path):
    commands = dry_run(tmp_path, "all")
    assert list(commands) == PAPER_RUNS
    resolve = resolve_run_module()
    for run, (environment, options, arguments) in commands.items():
        assert environment["RUN_DIR"] == str(tmp_path / "runs" / run)
        assert environment["NPROC_PER_NODE"] == "8"
        assert f"--job-name={run}" in options and "--nodes=4" in options
        assert "--gpus-per-node=8" in options
        configs, overrides = resolve.parse(list(arguments))
        overrides += [f"run_dir={environment['RUN_DIR']}", f"data.root={environment['DATA_ROOT']}",
                      f"data.tokenizer_model={environment['TOKENIZER']}"]
        config = load_config(configs, overrides)
        moe, optim, training, parallel = config.model.moe, config.optim, config.training, config.parallel
        # Common to every run (paper Table B): AdamW, wd 0.1, clip 1.0, bf16, 4M tokens/step.
        assert (optim.weight_decay, optim.clip_grad, optim.warmup_init_lr) == (0.1, 1.0, 1e-7)
        assert optim.decay_style == "cosine" and training.bf16
        assert training.global_batch_tokens == 4 * 1024 * 1024 and config.model.seq_length == 2048
        assert config.data.root == "/data/moepp"
        # The layout fits 32 GPUs and the batch splits into whole micro-batches.
        model_parallel = parallel.tensor * parallel.pipeline
        data_parallel = GPUS // model_parallel
        assert GPUS % model_parallel == 0 and moe.num_ffn_experts % parallel.expert == 0
        assert data_parallel % parallel.expert == 0
        sequences = training.global_batch_tokens // config.model.seq_length
        assert sequences % (training.micro_batch_size * data_parallel) == 0
        if run.startswith(("moepp-0", "moepp-1", "moepp-2", "vanilla-")):
            size = run.split("-")[1]
            n_ffn, constants = SIZES[size]
            assert training.train_tokens == 100_000_000_000
            assert (optim.lr, optim.min_lr, optim.warmup_iters) == (5e-4, 5e-5, 2000)
            assert config.data.mixture.endswith("configs/data/mix-s1.yaml")
            assert (parallel.tensor, parallel.pipeline) == (1, 1)
            assert moe.num_ffn_experts == n_ffn and moe.topk == 2
            assert config.model.num_layers == 12 and config.model.hidden_size == 768
            if run.startswith("moepp-"):
                assert moe.method == "moepp"
                assert moe.tau == float(run.split("tau")[1])
                assert (moe.num_zero_experts, moe.num_copy_experts, moe.num_constant_experts) == (1, 1, constants)
            else:
                assert moe.method == "vanilla" and moe.num_zc_experts == 0
            assert config.checkpoint.init_from is None
        else:
            assert moe.method == "moepp" and moe.num_ffn_experts == 16 and moe.tau == 0.75
            assert config.model.num_layers == 24 and config.model.hidden_size == 1536
            assert (parallel.tensor, parallel.pipeline) == (1, 8)
            if run == "moepp-7b-s2":
                assert training.train_tokens == 900_000_000_000
                assert (optim.lr, optim.min_lr, optim.warmup_iters) == (5e-4, 5e-5, 500)
                assert config.data.mixture.endswith("configs/data/mix-s1.yaml")
                assert config.checkpoint.init_from is None
            else:
                assert training.train_tokens == 100_000_000_000
                assert (optim.lr, optim.min_lr, optim.warmup_iters) == (1e-4, 1e-5, 200)
                assert config.data.mixture.endswith("configs/data/mix-s2.yaml")
                assert config.checkpoint.init_from == str(tmp_path / "runs/moepp-7b-s2/checkpoints")
                assert "--dependency=afterok:JOBID_moepp-7b-s2" in options
    # Together the strategy-1 runs are 18 x 100B tokens; the 7B is 900B + 100B.
    assert sum(r.startswith(("moepp-0", "moepp-1", "moepp-2", "vanilla-")) for r in commands) == 18


def test_the_benchmarks_paper_runs_are_the_scripts(tmp_path):
    """README's table of memory and step time per run (bench/presets.py) describes the runs
    this script submits."""
    from moepp_megatron.bench.presets import PAPER_RUNS as BENCH_RUNS

    commands = dry_run(tmp_path, *BENCH_RUNS)
    resolve = resolve_run_module()
    for name, run in BENCH_RUNS.items():
        configs, overrides = resolve.parse(list(commands[name][2]))
        assert load_config(configs, overrides) == load_config(run.configs, run.overrides), name


@pytest.mark.slurm
def test_submissions_reach_slurm_with_their_dependencies(slurm, tmp_path):
    """Held jobs (sbatch --hold) in the local cluster: names, logs, requeue flag, commands, and
    the 7B's stage 3 after stage 2 (afterok), as single jobs and as dependency chains."""
    env = {**slurm.env, "DATA_ROOT": "/data/moepp", "TOKENIZER": "/data/tok.model",
           "RUNS_ROOT": str(tmp_path / "runs"), "NODES": "1", "GPUS_PER_NODE": "0",
           "SBATCH_FLAGS": "--hold"}
    single = launcher("moepp-0.6b-tau0.50", "7b", env=env).stdout
    chained = launcher("--chain", "2", "moepp-7b-s2", "moepp-7b-s3", env=env).stdout
    jobs = {}
    for line in (single + chained).splitlines():
        run, ids = line.split(": job(s) ")
        jobs.setdefault(run, []).append([int(i) for i in ids.split("->")[0].split()])
    try:
        (small,), (s2,), (s3,) = jobs["moepp-0.6b-tau0.50"][0], jobs["moepp-7b-s2"][0], jobs["moepp-7b-s3"][0]
        info = slurm.job(small)
        assert info["JobName"] == "moepp-0.6b-tau0.50" and info["Requeue"] == "1"
        assert info["StdOut"] == str(tmp_path / f"runs/slurm-logs/moepp-0.6b-tau0.50-{small}.out")
        command = slurm.command("scontrol", "show", "job", str(small)).stdout
        assert (f"Command={REPO}/scripts/slurm/pretrain.sbatch configs/moepp-0.6b-8+4e.yaml "
                "configs/recipes/strategy1.yaml model.moe.tau=0.50 parallel.expert=8") in command
        assert slurm.job(s3)["Dependency"] == f"afterok:{s2}(unfulfilled)"
        chain2, chain3 = jobs["moepp-7b-s2"][1], jobs["moepp-7b-s3"][1]
        assert len(chain2) == len(chain3) == 2
        assert slurm.job(chain2[1])["Dependency"] == f"afterany:{chain2[0]}(unfulfilled)"
        assert slurm.job(chain3[0])["Dependency"] == f"afterok:{chain2[1]}(unfulfilled)"
        assert slurm.job(chain3[1])["Dependency"] == f"afterany:{chain3[0]}(unfulfilled)"
    finally:
        ids = [str(i) for group in jobs.values() for link in group for i in link]
        if ids:
            slurm.command("scancel", *ids, check=False)
