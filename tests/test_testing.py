"""rerank_server.testing: the helpers the tests and benchmarks share."""

from __future__ import annotations

import socket
from pathlib import Path

from rerank_server.testing import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    # A test that picks one port and then starts a server that picks its own must get two.
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


def test_free_ports_lie_below_the_range_outgoing_connections_take_theirs_from() -> None:
    # A port picked in the ephemeral range could become a client connection's local port before its server
    # binds it (make demo exports a model first: seconds, beside a suite opening thousands of connections).
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert all(port < low for port in ports), sorted(ports)[-5:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out
