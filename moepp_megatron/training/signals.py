"""The stop signals (SIGTERM / SIGUSR1: preemption, out of time) and keeping them away from
helper processes.

Slurm signals every process of a job step, helpers included (both signals end a process
that has no handler). A DataLoader worker ended that way fails the step in flight, and
dist_checkpointing's writer-queue manager the checkpoint the trainer then saves. Helpers are
started inside :func:`stop_signals_deferred`: the blocked-signal mask is inherited through
fork and exec, so they never receive the signals, and this process receives any that arrived
in the meantime as soon as the block ends.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from multiprocessing import resource_tracker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
