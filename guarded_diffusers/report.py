"""What the guard did, in a form people and programs can read: incidents, reports, the error."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass
class Attempt:
    """One strategy's try at an incident: ``outcome`` is applied, declined, raised, invalid or not held."""

    strategy: str
    outcome: str = "pending"
    detail: str = ""


@dataclasses.dataclass
class Incident:
    """One non-finite stage output and what was done about it.

    ``module`` is the first module whose output went non-finite, qualified from the pipeline
    component (``transformer.single_transformer_blocks.1.proj_mlp``); ``absmax`` is the
    largest magnitude its output reaches in float32 (``None`` where it was not measured);
    ``fixed_module`` is the region the strategy changed, which may enclose ``module``;
    ``attempts`` lists every strategy tried, in order, with what came of it.
    """

    stage: str
    step: int | None
    module: str | None
    absmax: float | None = None
    strategy: str | None = None
    fixed_module: str | None = None
    recovered: bool = False
    detail: str = ""
    attempts: list[Attempt] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values; a non-finite ``absmax`` becomes the string ``"nan"`` or ``"inf"`` (strict JSON)."""
        fields = dataclasses.asdict(self)
        if self.absmax is not None and not math.isfinite(self.absmax):
            fields["absmax"] = str(abs(self.absmax))
        return fields

    def summary(self) -> str:
        where = f"{self.stage}" + (f" step {self.step}" if self.step is not None else "")
        peak = f" (float32 absmax {self.absmax:.4g})" if self.absmax is not None else ""
        if self.recovered:
            outcome = f"recovered by {self.strategy} on {self.fixed_module}"
        else:
            outcome = f"not recovered: {self.detail}" if self.detail else "not recovered"
        return f"non-finite output at {where} in {self.module}{peak}; {outcome}"


@dataclasses.dataclass
class GuardReport:
    """Incidents of one pipeline call, in the order they happened."""

    incidents: list[Incident] = dataclasses.field(default_factory=list)

    @property
    def recovered(self) -> bool:
        """True when every incident was recovered (and trivially when there was none)."""
        return all(incident.recovered for incident in self.incidents)

    def to_dict(self) -> dict[str, Any]:
        return {"incidents": [incident.to_dict() for incident in self.incidents]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __str__(self) -> str:
        if not self.incidents:
            return "no incidents"
        return "\n".join(incident.summary() for incident in self.incidents)


class NonFiniteError(RuntimeError):
    """A stage produced NaN or inf and no strategy recovered it; ``report`` says what was tried."""

    def __init__(self, message: str, report: GuardReport) -> None:
        super().__init__(f"{message}\n{report}")
        self.report = report
