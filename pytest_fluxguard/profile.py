"""Hypothesis settings for models that take seconds per example.

No deadline (one example may take minutes on a large model, and the first includes warm-up);
failing examples saved under ``<rootdir>/.hypothesis/examples`` so the next run replays them
first; derandomised when ``CI`` is set (hypothesis' own test for CI), so a CI failure replays
locally with the same examples. The settings are applied per test, on top of whatever profile
the user loaded, never by loading a profile globally. ``--hypothesis-profile=fluxguard`` loads
the same settings for every hypothesis test of a session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PROFILE = "fluxguard"


def fluxguard_settings(
    rootdir: Path, max_examples: int | None = None, parent: Any = None, verbosity: Any = None
) -> Any:
    """``parent`` (default: the loaded profile) with the settings above and the arguments given."""
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    overrides: dict[str, Any] = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],  # drawing a 1024 px picture takes a while
    }
    if "CI" in os.environ:
        overrides.update(derandomize=True, database=None)
    else:
        overrides["database"] = DirectoryBasedExampleDatabase(rootdir / ".hypothesis" / "examples")
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    if verbosity is not None:
        overrides["verbosity"] = verbosity
    return settings(parent, **overrides)


def register_profile(rootdir: Path) -> None:
    """Register the ``fluxguard`` profile, for ``--hypothesis-profile=fluxguard``."""
    from hypothesis import settings

    settings.register_profile(PROFILE, fluxguard_settings(rootdir))
