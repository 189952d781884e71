"""Flux Fill in float16 without black images: detect non-finite values at every stage and recover."""

from .pipeline import GuardedFluxFillPipeline, GuardedFluxPipelineOutput
from .recovery import Fix, RecoveryStrategy
from .report import GuardReport, Incident, NonFiniteError

__all__ = [
    "Fix",
    "GuardReport",
    "GuardedFluxFillPipeline",
    "GuardedFluxPipelineOutput",
    "Incident",
    "NonFiniteError",
    "RecoveryStrategy",
]
__version__ = "0.1.0"
