"""hypothesis' clock held still during an item's search: a run depends on its seed and options, not speed.

hypothesis' engine stops looking for further failures 10 seconds after it found the first one, and
stops shrinking after 300 seconds. How many examples fit in those seconds depends on the machine,
its load and the model, so the same seed on the same weights would report different failures, or
the same failure shrunk to different examples, from one run to the next (on a loaded 2-core machine
the second of two failures came back unshrunk). While an item runs, the engine reads a clock that
never moves; the search then ends by counts alone: hypothesis' own (calls after the last failure,
successful shrinks) and the item's shrink budget (``--fluxguard-max-shrinks`` calls per distinct
failure). Only the engine's module sees the still clock; hypothesis' statistics then show zero
durations for the item's phases.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class StillClock:
    """``time`` as hypothesis' engine uses it, with ``monotonic`` and ``perf_counter`` stopped at 0."""

    def monotonic(self) -> float:
        return 0.0

    def perf_counter(self) -> float:
        return 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def still_clock() -> Iterator[None]:
    """Run hypothesis' engine on ``StillClock`` inside the block; the real clock again after it.

    Raises RuntimeError if this hypothesis' engine no longer reads the ``time`` module, rather than
    run a search whose result would again depend on the machine's speed.
    """
    from hypothesis.internal.conjecture import engine

    if getattr(engine, "time", None) is not time:
        raise RuntimeError(
            "pytest_fluxguard cannot hold hypothesis' clock still in this hypothesis version "
            "(its engine no longer reads the time module): searches would depend on the machine's speed."
        )
    engine.time = StillClock()  # type: ignore[assignment]
    try:
        yield
    finally:
        engine.time = time
