"""Rendezvous ports: outside the kernel's ephemeral range, and never handed out twice in a test
session (two xdist workers once lost a Slurm job's rendezvous to a gloo connection that took
the port the kernel had just picked for it)."""

from __future__ import annotations

import random
import socket

import pytest

import tests.distributed as harness
from moepp_megatron.parallel import ports


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    ephemeral = ports._ephemeral_ports()
    for _ in range(20):
        port = ports.free_port()
        assert port not in ephemeral and ports._LOWEST_PORT <= port < 65536
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_port_follows_the_configured_ephemeral_range(tmp_path, monkeypatch):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("10000\t65000\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_PORTS", range_file)
    assert all(65000 < ports.free_port() for _ in range(20))


def test_free_port_skips_ports_in_use(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        # Only the busy port is a candidate when every other one counts as ephemeral.
        monkeypatch.setattr(ports, "_LOWEST_PORT", busy)
        monkeypatch.setattr(ports, "_ephemeral_ports", lambda: range(busy + 1, 65536))
        with pytest.raises(RuntimeError, match="no free TCP port"):
            ports.free_port()


def test_free_port_ignores_the_seeded_random_module():
    """Ranks seed Python's random alike; their port picks must still differ."""
    picks = []
    for _ in range(2):
        random.seed(1234)
        picks.append([ports.free_port() for _ in range(5)])
    assert picks[0] != picks[1]


def test_find_free_port_never_hands_out_a_claimed_port(monkeypatch, tmp_path):
    offered = iter([20001, 20001, 20002])
    monkeypatch.setattr(harness, "free_port", lambda: next(offered))
    monkeypatch.setattr(harness, "_PORT_CLAIMS", tmp_path)
    assert [harness.find_free_port(), harness.find_free_port()] == [20001, 20002]
