"""Flux Fill in float16 without black images: detect non-finite values at every stage and recover.

The public names are imported on first use (PEP 562), so ``import guarded_diffusers`` and the
``fluxguard`` command's ``--help`` do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hookspecs import hookimpl
    from .options import GuardOptions
    from .pipeline import GuardedFluxFillPipeline, GuardedFluxPipelineOutput
    from .plan import PrecisionPlan
    from .plugins import plugin_manager
    from .recovery import Declined, Fix, RecoveryStrategy
    from .report import Attempt, DegradedFixWarning, FixInForce, GuardReport, Incident, NonFiniteError

# Public name -> the submodule that defines it.
_EXPORTS = {
    "Attempt": "report",
    "Declined": "recovery",
    "DegradedFixWarning": "report",
    "Fix": "recovery",
    "FixInForce": "report",
    "GuardOptions": "options",
    "GuardReport": "report",
    "GuardedFluxFillPipeline": "pipeline",
    "GuardedFluxPipelineOutput": "pipeline",
    "Incident": "report",
    "NonFiniteError": "report",
    "PrecisionPlan": "plan",
    "RecoveryStrategy": "recovery",
    "hookimpl": "hookspecs",
    "plugin_manager": "plugins",
}

__all__ = [
    "Attempt",
    "Declined",
    "DegradedFixWarning",
    "Fix",
    "FixInForce",
    "GuardOptions",
    "GuardReport",
    "GuardedFluxFillPipeline",
    "GuardedFluxPipelineOutput",
    "Incident",
    "NonFiniteError",
    "PrecisionPlan",
    "RecoveryStrategy",
    "hookimpl",
    "plugin_manager",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
