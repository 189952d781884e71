"""Flux Fill in float16 without black images: detect non-finite values at every stage and recover.

The public names are imported on first use (PEP 562), so ``import guarded_diffusers`` and the
``fluxguard`` command's ``--help`` do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.devices import resolve_device
    from .core.fidelity import as_displayed, psnr
    from .core.hookspecs import hookimpl
    from .core.options import GuardOptions
    from .core.plan import PrecisionPlan
    from .core.plugins import plugin_manager
    from .core.recovery import Declined, Fix, RecoveryStrategy
    from .core.report import Attempt, DegradedFixWarning, FixInForce, GuardReport, Incident, NonFiniteError
    from .pipelines.flux_fill import GuardedFluxFillPipeline, GuardedFluxPipelineOutput

# Public name -> the submodule that defines it.
_EXPORTS = {
    "Attempt": "core.report",
    "Declined": "core.recovery",
    "DegradedFixWarning": "core.report",
    "Fix": "core.recovery",
    "FixInForce": "core.report",
    "GuardOptions": "core.options",
    "GuardReport": "core.report",
    "GuardedFluxFillPipeline": "pipelines.flux_fill",
    "GuardedFluxPipelineOutput": "pipelines.flux_fill",
    "Incident": "core.report",
    "NonFiniteError": "core.report",
    "PrecisionPlan": "core.plan",
    "RecoveryStrategy": "core.recovery",
    "as_displayed": "core.fidelity",
    "hookimpl": "core.hookspecs",
    "plugin_manager": "core.plugins",
    "psnr": "core.fidelity",
    "resolve_device": "core.devices",
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
    "as_displayed",
    "hookimpl",
    "plugin_manager",
    "psnr",
    "resolve_device",
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
