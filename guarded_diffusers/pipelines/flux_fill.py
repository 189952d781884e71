"""GuardedFluxFillPipeline: FluxFillPipeline that never returns a silent black image."""

from __future__ import annotations

from typing import ClassVar

from diffusers import FluxFillPipeline

from .guarded import GuardedPipeline
from .outputs import GuardedFluxPipelineOutput


class GuardedFluxFillPipeline(GuardedPipeline, FluxFillPipeline):
    """Drop-in FluxFillPipeline that checks every stage for NaN/inf and recovers in place.

    Load it like the original (``from_pretrained``, ``from_pipe``), optionally choosing the
    recovery strategies in order (``guard_strategies=["rescale", "clamp"]``) and a precision plan
    to apply before the first step (``guard_plan=path``). Each call's output gains
    ``guard_report``. Fixes persist across calls; ``pipe.guard.reset()`` undoes them exactly.
    If nothing recovers a stage, the call raises ``NonFiniteError`` with the report.
    """

    required_inputs: ClassVar[dict[str, str]] = {"image": "the picture whose masked area is filled"}


__all__ = ["GuardedFluxFillPipeline", "GuardedFluxPipelineOutput"]
