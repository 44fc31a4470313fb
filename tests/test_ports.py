from __future__ import annotations

import socket

from tests.ports import _ephemeral_low, free_port


def test_free_port_is_bindable_and_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(5)}
    low = _ephemeral_low()
    for port in ports:
        assert 1024 <= port < 65536
        if low - 10000 >= 1000:  # room below the range: never a port clients take
            assert port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
