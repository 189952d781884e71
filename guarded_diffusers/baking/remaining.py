"""What a bake cannot fix: modules that still overflow float16 after it, found by the headroom scan.

An overflow inside a layer (a feed-forward's first projection feeding GELU) has no exact rescale:
GELU is not homogeneous, and nothing between the projection and its reader normalises. The scan's
recorder runs with the baked float32 run; every module still under ``MARGIN_BITS`` of float16
headroom is named (the innermost ones: an enclosing block is at risk because its layer is), and
the scan's precision plan covers them for the guarded pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from ..core.plan import PrecisionPlan
from ..scan.headroom import AbsmaxRecorder, HeadroomScan, merge
from ..scan.plan import plan_from_scan

MARGIN_BITS = 1.0
ADVICE = (
    "no exact rescale exists inside a layer: run it guarded (GuardedFluxFillPipeline, or "
    "guard(pipe)), with the precision plan --plan writes beside the weights (guard_plan=...)"
)


@dataclasses.dataclass(frozen=True)
class Remaining:
    """A module still out of float16's range after the bake, with its float32 peak."""

    module: str
    absmax: float
    reason: str = ADVICE

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "absmax": self.absmax, "reason": self.reason}


@contextlib.contextmanager
def recording(pipe: Any, found: list[HeadroomScan]) -> Iterator[None]:
    """Within: every module's float32 peaks are recorded; on exit, the merged scan is appended."""
    recorder = AbsmaxRecorder(pipe)
    records = []
    try:
        yield
        records.append(recorder.take(0))
    finally:
        recorder.remove()
    found.append(
        merge(
            records,
            recorder.classes,
            model="(bake)",
            dtype="float16",
            margin_bits=MARGIN_BITS,
            sampling={},
            layout=recorder.layout,
        )
    )


def remaining(scan: HeadroomScan) -> list[Remaining]:
    """The innermost at-risk modules, in name order; only the layers among them when there are any
    (a dropout or an activation between two out-of-range layers says nothing more)."""
    names = {module.module: module for module in scan.at_risk}
    innermost = [
        name for name in names if not any(other.startswith(f"{name}.") for other in names if other != name)
    ]
    layers = [name for name in innermost if names[name].layer]
    return [
        Remaining(name, max(names[name].absmax, names[name].input_absmax))
        for name in sorted(layers or innermost)
    ]


def plan_for(scan: HeadroomScan) -> PrecisionPlan:
    """The scan's precision plan for what remains (float32 islands, residual fixes)."""
    return plan_from_scan(scan)
