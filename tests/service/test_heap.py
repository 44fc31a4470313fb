"""The start-up heap is frozen out of the collector's full passes while the service runs."""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.heap import freeze_startup_heap, thaw_heap
from service.settings import Settings


def test_freeze_moves_what_is_alive_to_the_permanent_generation_and_thaw_returns_it() -> None:
    kept = [object() for _ in range(10)]  # alive at the freeze
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0 and kept


def test_the_service_freezes_once_loaded_and_thaws_when_it_stops(tiny_checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint, max_wait_ms=2.0))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
