"""The tests' port picker (fast tier): gateways and peers are configured before they start, so a port handed out
once must never be handed out again, even after the kernel has let go of it."""

from __future__ import annotations

from gateway.devtools.ports import free_port


def test_no_port_is_handed_out_twice() -> None:
    ports = [free_port() for _ in range(2000)]  # the kernel repeats itself well within this many
    assert len(set(ports)) == len(ports)
