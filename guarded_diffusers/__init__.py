"""Flux Fill in float16 without black images: detect non-finite values at every stage and recover."""

from .hookspecs import hookimpl
from .pipeline import GuardedFluxFillPipeline, GuardedFluxPipelineOutput
from .plan import PrecisionPlan
from .plugins import plugin_manager
from .recovery import Fix, RecoveryStrategy
from .report import Attempt, GuardReport, Incident, NonFiniteError

__all__ = [
    "Attempt",
    "Fix",
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
