"""Multi-process test harness (CPU + gloo).

``run_distributed(fn, world_size, *args, **kwargs)`` starts ``world_size`` processes with the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) plus
``MOEPP_CPU_MODE=1``, runs ``fn(*args, **kwargs)`` in each and returns the return values ordered
by rank. ``fn`` must be a picklable top-level function; its return value must be picklable
(tensors are copied, not shared). A failing rank raises :class:`DistributedTestError` in the
parent with that rank's traceback; a run that exceeds ``timeout`` seconds is killed and raises
:class:`DistributedTestTimeout`. All processes (and anything they started) are killed before
``run_distributed`` returns or raises.

Ranks are forked from a fork server (one per test session) that has imported torch,
megatron-core and the package once (:data:`PRELOAD`): a fresh ``spawn`` spent seconds of CPU
per rank re-importing them. The server is a new interpreter that only imports: no threads
(it starts with ``OMP_NUM_THREADS=1``, so numpy's BLAS starts none), no process group, no CPU
mode patch, no pytest state. multiprocessing gives each rank the caller's sys.path and working
directory of the moment; run_distributed gives it the caller's environment (the server's is
that of its start). Each rank applies the CPU mode itself, as before.

Example::

    def _worker(x):
        from moepp_megatron.parallel.initialize import initialize_parallel
        initialize_parallel(expert_parallel=2)
        ...
        return {"loss": loss.detach()}

    def test_something():
        results = run_distributed(_worker, 2, 3.0)
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

from moepp_megatron.parallel.ports import free_port

__all__ = ["run_distributed", "find_free_port", "forget_port_claims", "DistributedTestError", "DistributedTestTimeout"]

DEFAULT_TIMEOUT_S = 300.0

# Imported once by the fork server. Only modules without import-time side effects on the
# process (moepp_megatron.training.train sets warning filters: each rank imports it itself).
PRELOAD = [
    "numpy",
    "torch",
    "torch.distributed",
    "transformers",
    "megatron.core",
    "megatron.core.dist_checkpointing",
    "megatron.core.distributed",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "moepp_megatron.model.builder",
    "moepp_megatron.parallel.initialize",
    "moepp_megatron.training.trainer",
]


class DistributedTestError(RuntimeError):
    """A rank raised (or died); the message holds its traceback."""


class DistributedTestTimeout(DistributedTestError, TimeoutError):
    """The run did not finish in time; all processes were killed."""


# Ports handed out in this test session, one empty file each: the directory is made by the
# first process that imports this module (pytest's controller) and inherited by the xdist
# workers and every subprocess through the environment.
_CLAIMS_VARIABLE = "MOEPP_TEST_PORT_CLAIMS"
_CLAIMS_MADE_HERE = _CLAIMS_VARIABLE not in os.environ
if _CLAIMS_MADE_HERE:
    os.environ[_CLAIMS_VARIABLE] = tempfile.mkdtemp(prefix="moepp-test-ports-")
_PORT_CLAIMS = Path(os.environ[_CLAIMS_VARIABLE])


def forget_port_claims() -> None:
    """End of the session: the process that made the claims directory removes it."""
    if _CLAIMS_MADE_HERE:
        shutil.rmtree(_PORT_CLAIMS, ignore_errors=True)


def find_free_port() -> int:
    """A free TCP port on 127.0.0.1 that no other process of this test session was given.

    ``free_port`` keeps clear of the ports the kernel gives outgoing connections; the claim keeps
    clear of ports another worker (or its Slurm job, torchrun or GPU-check stage) was handed
    and has not bound yet.
    """
    _PORT_CLAIMS.mkdir(parents=True, exist_ok=True)
    while True:
        port = free_port()
        try:
            os.close(os.open(_PORT_CLAIMS / str(port), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return port


def _child(fn, rank: int, world_size: int, port: int, results, environ: dict, args, kwargs) -> None:
    os.environ.clear()
    os.environ.update(environ)
    # Own process group, so the parent can kill this rank together with anything it spawned
    # (e.g. the multiprocessing manager that dist_checkpointing starts).
    try:
        os.setpgrp()
    except OSError:
        pass
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MOEPP_CPU_MODE="1",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set / parallel work already started
    try:
        value = fn(*args, **kwargs)
        payload = pickle.dumps(value)  # plain pickle: tensors are copied, not shared memory
        results.put((rank, True, payload))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        tb = traceback.format_exc()
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{tb}"))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort
            pass


def _kill(proc) -> None:
    if proc.pid is None:
        return
    if proc.is_alive():
        try:
            # Only kill the group when the child has become its leader (see _child).
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.join(timeout=10)
    if proc.is_alive():  # pragma: no cover - should not happen after SIGKILL
        proc.kill()
        proc.join(timeout=10)


def _reap_group(pid: int) -> None:
    # A rank that exited normally may leave helpers in its process group; kill them.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT_S,
    **kwargs: Any,
) -> list:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` fresh processes; return values by rank.

    Raises:
        DistributedTestError: a rank raised or died (message: that rank's traceback).
        DistributedTestTimeout: not all ranks finished within ``timeout`` seconds.
    """
    __tracebackhide__ = True  # pytest: show the rank's traceback, not this loop
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for attempt in range(PORT_ATTEMPTS):
        try:
            return _run_once(fn, world_size, args, kwargs, timeout)
        except DistributedTestError as error:
            # find_free_port races with other processes binding ports in between: the rank
            # failed before doing any work, so start again on another port.
            if "EADDRINUSE" not in str(error) or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


PORT_ATTEMPTS = 3


def _forkserver_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the server's environment is the one of its start
    try:
        multiprocessing.forkserver.ensure_running()  # no-op while the server is up
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return ctx


def _run_once(fn, world_size: int, args, kwargs, timeout: float) -> list:
    __tracebackhide__ = True
    ctx = _forkserver_context()
    results = ctx.Queue()
    port = find_free_port()
    procs = []
    values: dict[int, Any] = {}
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, port, results, dict(os.environ), args, kwargs),
                name=f"rank{rank}",
                daemon=False,  # ranks may start helper processes (dist-ckpt manager)
            )
            p.start()
            procs.append(p)

        deadline = time.monotonic() + timeout
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise DistributedTestTimeout(
                    f"{getattr(fn, '__name__', fn)}: ranks {missing} did not finish within "
                    f"{timeout:.0f} s (hang?); all {world_size} processes were killed"
                )
            try:
                rank, ok, payload = results.get(timeout=min(0.5, remaining))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if r not in values and p.exitcode is not None
                ]
                if not dead:
                    continue
                try:  # a rank that just exited may still be flushing its result
                    rank, ok, payload = results.get(timeout=2.0)
                except queue.Empty:
                    raise DistributedTestError(
                        f"{getattr(fn, '__name__', fn)}: rank {dead[0]} died with exit code "
                        f"{procs[dead[0]].exitcode} without reporting a result"
                    ) from None
            if not ok:
                raise DistributedTestError(
                    f"{getattr(fn, '__name__', fn)}: rank {rank} of {world_size} failed:\n"
                    f"{payload}"
                )
            values[rank] = pickle.loads(payload)

        for p in procs:
            p.join(timeout=max(5.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            _kill(p)
            if p.pid is not None:
                _reap_group(p.pid)
        results.close()
        results.join_thread()
    return [values[r] for r in range(world_size)]
