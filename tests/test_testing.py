"""rerank_server.testing: the helpers the tests and benchmarks share."""

from __future__ import annotations

from rerank_server.testing import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    # The kernel gives a port just released again often (here about one pick in fifteen over 2,000), and a
    # test that picks one port and then starts a server that picks its own must get two.
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
