"""Loopback ports for the servers the tests start, chosen below the kernel's ephemeral range.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, which is also
where every outgoing connection takes its local port. A server that a test kills and
restarts on the same port (the crash tests) can then find it taken by some client's
connection in between ("address already in use"). Ports below the range are never taken
that way.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # clear of the well-known and most registered service ports


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range where there is room."""
    high = _ephemeral_low() - 1
    if high - _LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randint(_LOWEST, high)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
