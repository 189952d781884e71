"""An item's hypothesis search depends on its seed and options alone: not on speed, not on the process.

Two things in hypothesis' engine depend on more than the seed:

- **Time.** It stops looking for further failures 10 seconds after it found the first one, and
  stops shrinking after 300 seconds. How many examples fit in those seconds depends on the machine,
  its load and the model, so the same seed on the same weights would report different failures, or
  the same failure shrunk to different examples (on a loaded 2-core machine the second of two
  failures came back unshrunk). While an item runs, the engine reads a clock that never moves; the
  search then ends by counts alone: hypothesis' own (calls after the last failure, successful
  shrinks) and the item's shrink budget (``--fluxguard-max-shrinks`` calls per distinct failure).
  hypothesis' statistics then show zero durations for the item's phases.
- **What else is imported.** Now and then hypothesis draws a literal found in the source of the
  local modules imported so far (everything outside site-packages and tests: a model author's
  repository, this project when installed editable), so the same seed draws other prompts and
  numbers in a process that imported one more module. An item draws only from hypothesis' own
  fixed constants.
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
def reproducible_search() -> Iterator[None]:
    """Inside the block, hypothesis' engine runs on ``StillClock`` and draws no local constants.

    Raises RuntimeError when this hypothesis version keeps either elsewhere, rather than run a
    search whose result would depend on the machine or the process.
    """
    from hypothesis.internal.conjecture import engine, providers
    from hypothesis.internal.constants_ast import Constants

    if getattr(engine, "time", None) is not time or not all(
        hasattr(providers, name) for name in ("_get_local_constants", "CONSTANTS_CACHE")
    ):
        raise RuntimeError(
            "pytest_fluxguard cannot make this hypothesis version's search reproducible (its engine "
            "no longer reads the time module, or keeps local constants elsewhere): results would "
            "depend on the machine and on what the process imported."
        )
    local_constants, cache = providers._get_local_constants, providers.CONSTANTS_CACHE
    engine.time = StillClock()  # type: ignore[assignment]
    providers._get_local_constants = Constants
    providers.CONSTANTS_CACHE = type(cache)(cache.max_size)
    try:
        yield
    finally:
        engine.time = time
        providers._get_local_constants, providers.CONSTANTS_CACHE = local_constants, cache
