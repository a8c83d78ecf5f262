"""One JSON record per benchmark run: what ran where, with which code, and the numbers.

Records are named ``YYYYMMDD-HHMMSS_<device>_<benchmark>.json`` and never overwritten;
the README tables are built from the latest record per (benchmark, device).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
# The checkout this package runs from. bench/results and README.md belong to it: a wheel
# installed without the repository has neither (REPO_ROOT is site-packages there).
REPO_ROOT = Path(__file__).resolve().parents[2]
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
RECORD_KEYS = ("schema_version", "benchmark", "created_utc", "device", "versions", "git", "config", "results")


def repo_default(relative: str) -> dict:
    """argparse keywords for an option whose default is a path in the repository: that
    path in a checkout; outside one the option is required, and argparse says so."""
    return {"default": REPO_ROOT / relative} if IN_CHECKOUT else {"required": True}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    import torch  # here, not at the top: the CLIs' --help must not pay for it

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda", "name": props.name, "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory,
        }
    return {"type": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def device_slug(device: dict) -> str:
    """'cpu' or the GPU's name in lower case, e.g. 'nvidia-h100-80gb-hbm3'."""
    if device["type"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
        "moepp_megatron": _version("moepp-megatron"),
    }


def git_state(repo: Path = REPO_ROOT) -> dict:
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def new_record(benchmark: str, device: torch.device, config: dict, results: list[dict]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "git": git_state(),
        "config": config,
        "results": results,
    }


def new_record_path(record: dict, results_dir: Path) -> Path:
    """``results_dir/YYYYMMDD-HHMMSS_<device>_<benchmark>.json``, not taken yet."""
    created = datetime.datetime.fromisoformat(record["created_utc"])
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{created:%Y%m%d-%H%M%S}_{device_slug(record['device'])}_{record['benchmark']}"
    path = results_dir / f"{stem}.json"
    suffix = 1
    while path.exists():
        path = results_dir / f"{stem}-{suffix}.json"
        suffix += 1
    return path


def save_record(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record, indent=1) + "\n")


def write_record(
    benchmark: str, device: torch.device, config: dict, results: list[dict], results_dir: Path
) -> Path:
    record = new_record(benchmark, device, config, results)
    path = new_record_path(record, results_dir)
    save_record(record, path)
    return path


def records_of(benchmark: str, results_dir: Path) -> list[dict]:
    """Every record of ``benchmark`` in ``results_dir``, newest first."""
    records = (_read_record(path) for path in sorted(Path(results_dir).glob(f"*_{benchmark}*.json"), reverse=True))
    return [record for record in records if record["benchmark"] == benchmark]


def latest_records(results_dir: Path) -> dict[tuple[str, str], dict]:
    """The newest record per (benchmark, device slug); file names sort by time."""
    latest: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        record = _read_record(path)
        latest[(record["benchmark"], device_slug(record["device"]))] = record
    return latest


def _read_record(path: Path) -> dict:
    """The record, with its file name as ``path``."""
    record = json.loads(path.read_text())
    record["path"] = path.name
    return record
