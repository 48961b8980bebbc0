"""Full garbage collections of this process, counted and timed, and the heap frozen once serving starts.

Python's cyclic collector walks every tracked object in a full (generation 2) collection; an engine's
process holds ~370k of them after loading (torch, transformers, the model, its graphs): ~165 ms a full
collection on a 2-core machine, on whichever thread triggered it, the engine loop's included. Contract:

* ``gc_watch()`` installs one ``GcWatch`` per process (``gc.callbacks``) and returns it: ``num_full``
  collections of generation 2 since then and the ``seconds`` they took (the engine's stats and metrics).
* ``freeze_heap()`` collects once, then moves every object left to the permanent generation
  (``gc.freeze``): a later full collection walks only what was made after it. Called when the engine's loop
  starts (after loading, warm-up and graph capture); ``unfreeze_heap()`` when it stops hands them back to
  the collector.
"""

from __future__ import annotations

import gc
import threading
import time

_lock = threading.Lock()
_watch: GcWatch | None = None


class GcWatch:
    def __init__(self) -> None:
        self.num_full = 0
        self.seconds = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.num_full += 1
            self.seconds += time.perf_counter() - self._started
            self._started = None


def gc_watch() -> GcWatch:
    """This process's ``GcWatch``, installed on first use."""
    global _watch
    with _lock:
        if _watch is None:
            _watch = GcWatch()
            gc.callbacks.append(_watch)
        return _watch


def freeze_heap() -> int:
    """Collect, then freeze what is left (see the module contract); returns the objects now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_heap() -> None:
    """Hand the frozen objects back to the collector (``gc.unfreeze``)."""
    gc.unfreeze()
