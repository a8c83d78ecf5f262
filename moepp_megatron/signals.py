"""The stop signals (SIGTERM / SIGUSR1: preemption, out of time; SIGINT: Ctrl-C), recorded
from the first line of a rank's main, and kept away from helper processes.

A stop signal is only recorded: the trainer acts on it between steps (every rank finishes
its step, saves, exits 75), or right after restoring when it arrived during start-up
(imports, process groups, model build, checkpoint load: minutes at scale). A second SIGINT
while a stop is pending ends the process at once, without a checkpoint.

Slurm signals every process of a job step, helpers included (each signal ends a process
that has no handler). A DataLoader worker ended that way fails the step in flight, and
dist_checkpointing's writer-queue manager the checkpoint the trainer then saves. Helpers are
started inside :func:`stop_signals_deferred`: the blocked-signal mask is inherited through
fork and exec, so they never receive the signals, and this process receives any that arrived
in the meantime as soon as the block ends.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """The first stop signal this process received (its name), or None."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            _say("second interrupt: exiting now, without a checkpoint")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            again = " (Ctrl-C again: exit at once, without one)" if signum == signal.SIGINT else ""
            _say(f"{self.signal} received: stopping after this step with a checkpoint{again}")


def _say(message: str) -> None:
    # os.write: print() from a signal handler can re-enter a write in progress.
    if os.environ.get("RANK", "0") == "0":
        os.write(sys.stderr.fileno(), f"{message}\n".encode())


# One per process: installed first thing by the entry point, read by the trainer.
stop_request = StopRequest()


@contextmanager
def stop_signals_deferred():
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # multiprocessing's resource tracker unblocks SIGTERM when it starts (bpo-33613),
        # which spawned helpers would inherit: start it now, then block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
