"""Pipeline outputs with the guard's report: ``Guarded<Output>``, one subclass per diffusers output class.

A subclass, so ``isinstance(output, FluxPipelineOutput)`` and every field the parent has still hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import BaseOutput

from ..core.report import GuardReport

# Each diffusers output class -> its subclass with ``guard_report``.
_WITH_REPORT: dict[type, type] = {}


@dataclasses.dataclass
class GuardedFluxPipelineOutput(FluxPipelineOutput):
    """``FluxPipelineOutput`` plus ``guard_report``: the incidents of this call."""

    guard_report: GuardReport | None = None


_WITH_REPORT[FluxPipelineOutput] = GuardedFluxPipelineOutput


def with_report(output: Any, report: GuardReport) -> Any:
    """``output`` as its class's ``Guarded`` subclass with ``guard_report`` set; anything else unchanged."""
    if not isinstance(output, BaseOutput):
        return output
    cls = type(output)
    guarded = _WITH_REPORT.get(cls)
    if guarded is None:
        guarded = _WITH_REPORT[cls] = dataclasses.make_dataclass(
            f"Guarded{cls.__name__}",
            [("guard_report", GuardReport | None, dataclasses.field(default=None))],
            bases=(cls,),
            namespace={"__doc__": f"``{cls.__name__}`` plus ``guard_report``: the incidents of this call."},
        )
    fields = {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
    return guarded(**fields, guard_report=report)
