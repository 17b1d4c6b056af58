"""Free TCP ports on loopback for the tests' own servers (`gateway.devtools.ports`)."""

from __future__ import annotations

from gateway.devtools.ports import free_port

__all__ = ["free_port"]
