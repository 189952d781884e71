"""The hooks a guarded-diffusers plugin can implement.

A plugin is any object or module with functions marked ``@guarded_diffusers.hookimpl`` and named
like the specifications below. Built-in strategies are plugins in exactly this sense; third-party
ones are found through the ``guarded_diffusers`` entry-point group (see ``plugins.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .recovery import RecoveryStrategy
    from .report import Incident

PROJECT_NAME = "guarded_diffusers"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_strategies(register: Callable[[RecoveryStrategy], None]) -> None:
    """Register recovery strategies by calling ``register(strategy)`` once for each.

    A strategy is shared by every pipeline in the process, so it must keep no per-pipeline
    state: everything it changes lives in the ``Fix`` it returns. Its ``name`` is how users
    select it (``guard_strategies=[...]``) and how precision plans refer to it; it must be unique.
    """


@hookspec
def incident_recorded(incident: Incident, pipeline: Any) -> None:
    """See every incident once it is settled (recovered or not), for logging or metrics.

    Observers take no part in recovery: the incident is final when this is called, and an
    exception raised here is logged and otherwise ignored so that it cannot break a pipeline call.
    """
