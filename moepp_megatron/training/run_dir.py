"""One job per run directory, workers that do not outlive their launcher, and the run's
outcome for the launching script.

Two jobs training in one run directory overwrite each other's checkpoints (and one of them
crashes in a save). The first rank holds ``<run_dir>/run.lock`` while it trains: a file
naming the holder (host, pid, Slurm job) whose modification time it refreshes every
minute. Another job finds it and stops with the holder's name; a lock whose holder is gone
(a dead pid on this host, an earlier run of the same Slurm job, or no refresh for
``STALE_AFTER_S``) is taken over with a warning.

torchrun starts the workers in process sessions of their own, so killing the launcher
alone leaves them training; :func:`stop_when_orphaned` makes them stop (checkpoint, exit)
when their parent goes away.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = "run.lock"
# An earlier trainer of this process (tests build several): taken over without a warning.
_HELD_HERE = "this process holds it"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class RunDirLockedError(RuntimeError):
    pass


def _me() -> dict:
    return {
        "host": socket.gethostname(), "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _why_stale(holder: dict, age_s: float) -> Optional[str]:
    """Why the holder of a lock is known to be gone, or None when it may be alive."""
    me = _me()
    if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return _HELD_HERE
    if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone"
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"] \
            and int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]:
        return "it belongs to an earlier run of this Slurm job"
    if age_s > STALE_AFTER_S:
        return f"it was last refreshed {age_s:.0f} s ago"
    return None


def _describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


class RunDirLock:
    """The run directory's lock, held by this process until :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._held = False

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a warning when a stale one was taken over. Raises
        :class:`RunDirLockedError` naming the holder when another job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                warning = self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            self._held = True
            threading.Thread(target=self._refresh, name="run-lock-heartbeat", daemon=True).start()
            return warning
        raise RunDirLockedError(f"{self.path.parent}: could not take {self.path} (another job raced for it)")

    def _take_over_if_stale(self) -> Optional[str]:
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile
        except (OSError, ValueError):
            holder = None
        if not isinstance(holder, dict):
            holder, age = {}, STALE_AFTER_S + 1  # unreadable: a crash while writing it
        reason = _why_stale(holder, age)
        if reason is None:
            raise RunDirLockedError(
                f"run directory {self.path.parent} is in use by another job ({_describe(holder)}); "
                f"two jobs in one run directory overwrite each other's checkpoints. Wait for it "
                f"to end, or use another run_dir. If that job is gone, delete {self.path}."
            )
        self.path.unlink(missing_ok=True)
        if reason == _HELD_HERE:
            return None
        return f"WARNING: took over {self.path}: {reason} ({_describe(holder)})"

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        self._held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def stop_when_orphaned(request_stop, poll_s: float = 1.0) -> None:
    """Call ``request_stop()`` once this process's parent (torchrun) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        request_stop()

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def write_outcome(outcome: str) -> bool:
    """Tell the launching script how the run ended (``complete``, ``stopped``: a checkpoint
    to resume from): scripts/pretrain.sh names the file in MOEPP_STATUS_FILE, one per node,
    written by the node's first local rank. Returns whether a launcher reads it."""
    path = os.environ.get("MOEPP_STATUS_FILE")
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(path).write_text(outcome + "\n")
    return bool(path)
