"""The start-up heap kept out of the cyclic garbage collector's full passes.

Importing torch, transformers and FastAPI leaves about 680,000 tracked objects that live as
long as the process. CPython's full (generation 2) collection walks all of them: about 0.3 s
here, with the GIL held, so every request and the batch worker stop for it. Under load the
requests' garbage triggers one every few hundred requests, which shows as the p99 latency and
costs throughput. :func:`freeze_startup_heap` moves what is alive once the model is loaded to
the collector's permanent generation (``gc.freeze``, as Instagram's servers and CPython's docs
suggest for long-lived processes); objects made later are collected as before, and
:func:`thaw_heap` gives the frozen ones back to the collector when the service stops.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what remains; returns the number of frozen objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Return the frozen objects to the collector (the oldest generation)."""
    gc.unfreeze()
