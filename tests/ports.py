"""Free loopback ports for the servers tests start."""

from __future__ import annotations

import socket

_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never one this test process handed out before:
    the kernel can give the same free port to two binds in a row, and a gateway's two
    listeners on one port refuse to start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
