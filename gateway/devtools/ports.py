"""Free TCP ports on loopback, for the development peers (Orthanc, the audit repository) and the tests' servers."""

from __future__ import annotations

import socket

_GIVEN: set[int] = set()  # ports this process has handed out: a peer may not listen on its port yet


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on right now and that this process has not handed out before.

    The kernel may give the same free port to two `bind(0)`s in a row once the first socket is closed, so two
    gateways configured one after the other, before either is started, could get the same port (seen in CI: a
    study stored into the wrong gateway, which refused the called AE title)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1 that was not handed out before")
