"""A real one-node Slurm cluster on the loopback address, for tests.

``LocalSlurm(base_dir)`` writes its own munge key and slurm.conf (NodeName=localhost with
this machine's CPU count, select/cons_tres, proctrack/linuxproc, task/none: no cgroups,
no accounting database), starts munged, slurmctld and slurmd as daemons on free ports with
every state/spool/log/pid file under ``base_dir``, and stops them again. Client commands
find it through ``SLURM_CONF`` (``cluster.env``). Nothing of a system Slurm or munge is
used or touched. Needs Debian's slurmctld, slurmd, slurm-client and munge packages
(tests/slurm/setup_slurm.sh) and root (slurmd runs jobs as their submitting user).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.distributed import find_free_port

SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    pass


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_commands() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if which(name) is None]


class LocalSlurm:
    def __init__(self, base_dir: Path) -> None:
        self.base = Path(base_dir)
        self.conf = self.base / "slurm.conf"
        self.munge_socket = self.base / "munge-socket" / "munge.socket"
        self._pid_files = {
            "slurmd": self.base / "slurmd.pid",
            "slurmctld": self.base / "slurmctld.pid",
            "munged": self.munge_socket.parent / "munged.pid",
        }

    @property
    def env(self) -> dict[str, str]:
        path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "LocalSlurm":
        missing = missing_commands()
        if missing:
            raise SlurmUnavailable(f"missing {', '.join(missing)}: run tests/slurm/setup_slurm.sh")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm cluster needs root (slurmd runs jobs as their user)")
        # munged refuses sockets in directories others cannot traverse.
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        for name in ("state", "spool", "log", "munge-key"):
            (self.base / name).mkdir(exist_ok=True)
        (self.base / "munge-key").chmod(0o700)
        self.munge_socket.parent.mkdir(exist_ok=True)
        self.munge_socket.parent.chmod(0o755)
        try:
            self._start_munge()
            self._write_conf()
            self._run([which("slurmctld"), "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld to answer")
            self._run([which("slurmd"), "-f", str(self.conf), "-N", "localhost"])
            self._wait(self._node_idle, "the node to become idle")
        except Exception:
            logs = self.logs()
            self.stop()
            raise SlurmUnavailable(f"the local Slurm cluster did not start\n{logs}") from None
        return self

    def stop(self) -> None:
        if self.conf.exists() and (self.base / "slurmctld.pid").exists():
            subprocess.run([which("scancel"), "--full", "--user", "root"], env=self.env,
                           capture_output=True, timeout=30)
        for name in DAEMONS[::-1]:
            self._kill(self._pid_files[name])

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("*.log")) + [self.base / "munge-key" / "munged.log"]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- jobs -----------------------------------------------------------------------------
    def command(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        cmd = [which(args[0]) or args[0], *args[1:]]
        result = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True,
                                text=True, timeout=kwargs.pop("timeout", 60), **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        out = self.command("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.command("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        # "Key=value Key=value ..." where values may hold spaces only in Command=...; fine here.
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after "
                    f"{timeout:.0f} s waiting for {what or '/'.join(states)}\n{self.logs()}"
                )
            time.sleep(0.5)

    def wait_for_idle_node(self, timeout: float) -> None:
        """Until the node has finished cleaning up after its jobs (no COMPLETING state): a
        job started before that can fail at once ("Job credential revoked")."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.command("scontrol", "show", "node", "--oneliner").stdout
            state = dict(re.findall(r"(\S+?)=(\S*)", out)).get("State", "")
            if state.startswith("IDLE") and "COMPLETING" not in state:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node still {state} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)

    # --- internals ------------------------------------------------------------------------
    def _start_munge(self) -> None:
        key = self.base / "munge-key" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self._run([
            which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self._pid_files['munged']}",
            f"--log-file={self.base / 'munge-key' / 'munged.log'}",
            f"--seed-file={self.base / 'munge-key' / 'munged.seed'}",
        ])
        self._wait(self.munge_socket.exists, "munged's socket")

    def _write_conf(self) -> None:
        b = self.base
        self.conf.write_text(f"""\
ClusterName=moepptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={find_free_port()}
SlurmdPort={find_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={self._pid_files['slurmctld']}
SlurmdPidFile={self._pid_files['slurmd']}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _run(self, cmd: list) -> None:
        result = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{cmd[0]} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def _ok(self, args: list[str], needle: str) -> bool:
        result = self.command(*args, check=False, timeout=20)
        return result.returncode == 0 and needle in result.stdout

    def _node_idle(self) -> bool:
        result = self.command("sinfo", "--noheader", "--format=%T", check=False, timeout=20)
        return result.returncode == 0 and result.stdout.strip().startswith("idle")

    @staticmethod
    def _wait(condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"timed out waiting for {what}")
            time.sleep(0.2)

    @staticmethod
    def _kill(pid_file: Path, timeout: float = 15.0) -> None:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
