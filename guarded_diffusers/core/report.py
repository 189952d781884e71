"""What the guard did, in a form people and programs can read: incidents, reports, the error."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass
class Attempt:
    """One strategy's try at an incident and what came of it.

    ``outcome``: ``applied`` (kept, within tolerance), ``degraded`` (finite but further from
    float32 than the tolerance), ``unmeasured`` (finite, but no float32 reference could be run),
    ``over budget`` (the fix needs more memory than the guard may add), ``declined``, ``raised``,
    ``invalid`` or ``not held``. ``error`` is the relative L2 error of the changed region against
    float32 where it was measured; ``extra_bytes`` what the fix added to parameter memory.
    """

    strategy: str
    outcome: str = "pending"
    detail: str = ""
    error: float | None = None
    extra_bytes: int | None = None


@dataclasses.dataclass
class FixInForce:
    """A fix held after a call: what it changed, what it costs in memory and how faithful it measured."""

    strategy: str
    module: str
    extra_bytes: int
    error: float | None = None

    def summary(self) -> str:
        error = f", error {self.error:.2g}" if self.error is not None else ""
        return f"{self.strategy} on {self.module} (+{_format_bytes(self.extra_bytes)}{error})"


def _format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def _json_number(value: float | None) -> float | str | None:
    return str(abs(value)) if value is not None and not math.isfinite(value) else value


class DegradedFixWarning(UserWarning):
    """A stage was made finite, but no fix came within the tolerance of float32: the image may be off."""


@dataclasses.dataclass
class Incident:
    """One non-finite stage output and what was done about it.

    ``module`` is the first module whose output overflowed, qualified from the pipeline
    component (``transformer.single_transformer_blocks.1.proj_mlp``); ``absmax`` is the
    largest magnitude its output reaches in float32 (``None`` where it was not measured);
    ``kind`` is ``"non-finite"`` (inf or NaN) or ``"saturated"`` (finite, but at the dtype's
    maximum, where diffusers and transformers clip the residual stream: silently wrong);
    ``fixed_module`` is the region the strategy changed, which may enclose ``module``;
    ``error`` is the relative L2 error against float32 of ``measured_module``'s output with the
    fix, on the inputs it had; ``recovered`` means finite *and* within the guard's tolerance;
    ``degraded`` means the kept fix made the stage finite but is further from float32 (or could
    not be measured); ``extra_bytes`` is the parameter memory the fix added;
    ``attempts`` lists every strategy tried, in order, with what came of it.
    """

    stage: str
    step: int | None
    module: str | None
    absmax: float | None = None
    kind: str = "non-finite"
    strategy: str | None = None
    fixed_module: str | None = None
    recovered: bool = False
    degraded: bool = False
    error: float | None = None
    measured_module: str | None = None
    extra_bytes: int = 0
    detail: str = ""
    attempts: list[Attempt] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values; a non-finite ``absmax`` or ``error`` becomes ``"nan"`` or ``"inf"`` (strict JSON)."""
        fields = dataclasses.asdict(self)
        fields["absmax"], fields["error"] = _json_number(self.absmax), _json_number(self.error)
        for attempt in fields["attempts"]:
            attempt["error"] = _json_number(attempt["error"])
        return fields

    def summary(self) -> str:
        where = f"{self.stage}" + (f" step {self.step}" if self.step is not None else "")
        peak = f" (float32 absmax {self.absmax:.4g})" if self.absmax is not None else ""
        error = f" (error {self.error:.2g} against float32)" if self.error is not None else ""
        if self.recovered:
            outcome = f"recovered by {self.strategy} on {self.fixed_module}{error}"
        elif self.degraded:
            outcome = f"DEGRADED: {self.strategy} on {self.fixed_module} is finite but {self.detail}"
        else:
            outcome = f"not recovered: {self.detail}" if self.detail else "not recovered"
        what = "saturated (clipped at the dtype's maximum)" if self.kind == "saturated" else "non-finite"
        return f"{what} output at {where} in {self.module}{peak}; {outcome}"


@dataclasses.dataclass
class GuardReport:
    """Incidents of one pipeline call, in the order they happened, and the fixes in force after it."""

    incidents: list[Incident] = dataclasses.field(default_factory=list)
    fixes: list[FixInForce] = dataclasses.field(default_factory=list)
    # Stages this pipeline gives the guard no way to check (no ``callback_on_step_end``: latents).
    unchecked: list[str] = dataclasses.field(default_factory=list)
    # Loaded from a baked folder: {component: {tensor: exponent}}, the powers of two the bake put in
    # the weights. A run-time ``stream_rescale`` fix multiplies on top of them.
    baked: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def recovered(self) -> bool:
        """True when every incident was recovered (and trivially when there was none)."""
        return all(incident.recovered for incident in self.incidents)

    @property
    def degraded(self) -> bool:
        """True when some incident was made finite by a fix that is not within tolerance of float32."""
        return any(incident.degraded for incident in self.incidents)

    @property
    def extra_bytes(self) -> int:
        """Parameter memory every fix in force adds together."""
        return sum(fix.extra_bytes for fix in self.fixes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "incidents": [incident.to_dict() for incident in self.incidents],
            "fixes": [dataclasses.asdict(fix) for fix in self.fixes],
            "unchecked": list(self.unchecked),
            "baked": {component: dict(exponents) for component, exponents in self.baked.items()},
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __str__(self) -> str:
        lines = [incident.summary() for incident in self.incidents] or ["no incidents"]
        if self.fixes:
            lines.append("fixes in force: " + "; ".join(fix.summary() for fix in self.fixes))
        if self.unchecked:
            lines.append("unchecked stages: " + ", ".join(self.unchecked))
        if self.baked:
            scaled = [_baked_summary(c, e) for c, e in self.baked.items() if e]
            lines.append("baked scales: " + ("; ".join(scaled) or "none"))
        return "\n".join(lines)


def _baked_summary(component: str, exponents: dict[str, int]) -> str:
    """``transformer: 16 tensors (2**-4)``: how many tensors the bake scaled, by which powers."""
    powers = ", ".join(f"2**{exponent}" for exponent in sorted(set(exponents.values())))
    return f"{component}: {len(exponents)} tensors ({powers})"


class NonFiniteError(RuntimeError):
    """A stage produced NaN or inf and no strategy recovered it; ``report`` says what was tried."""

    def __init__(self, message: str, report: GuardReport) -> None:
        super().__init__(f"{message}\n{report}")
        self.report = report
