"""Local TCP ports for rendezvous (torchrun, a single process's own group, study runs).

No torch here: test harnesses and launch helpers import it without paying for torch.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

# Ports below are left to well-known services.
_LOWEST_PORT = 10000
_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (Linux's default: 32768-60999)."""
    try:
        low, high = map(int, _EPHEMERAL_PORTS.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(attempts: int = 100) -> int:
    """A TCP port free on 127.0.0.1 now, chosen outside the kernel's ephemeral range.

    A port the kernel picks (bind to port 0) comes from the range it also gives outgoing
    connections: between this call and the caller's bind, any connection on the machine (gloo
    opens dozens per process group) may take it, and the rendezvous fails with EADDRINUSE.
    Ports outside that range are taken only on request. The pick is random (not Python's
    seeded ``random``: two processes seeded alike would pick alike).
    """
    ephemeral = _ephemeral_ports()
    everything = range(_LOWEST_PORT, 65536)
    candidates = [port for port in everything if port not in ephemeral] or list(everything)
    for port in random.SystemRandom().sample(candidates, min(attempts, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 outside {ephemeral} after {attempts} attempts")
