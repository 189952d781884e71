"""Settling one located overflow: try the strategies in order, keep the first faithful fix.

Each attempt applies a strategy's fix, refuses it over the memory budget, recomputes the stage
with the very inputs it had (recording the located chain), checks that the fix holds (no raise,
same output structure, no overflow left inside what it changed) and measures it against float32
with the fix lifted. Within tolerance: kept as recovered. Otherwise it is reverted, the next
strategy tries, and if none comes within tolerance the most faithful finite fix is re-applied and
kept as degraded (or, with ``guard_fidelity="strict"``, the call raises). A failed attempt leaves
the component as the first attempt found it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .casting import tensor_bytes
from .compiled import eager_call
from .ledger import FixLedger
from .locate import Location
from .measure import Captured, Measurement, capturing, measure
from .options import GuardOptions
from .recovery import Declined, Fix, ModuleLookup, RecoveryStrategy
from .replay import ArgumentState
from .report import Attempt, FixInForce, Incident, NonFiniteError
from .state import StructureSnapshot
from .stream import StreamWatch, stage_verdict

# Strategies tried per incident at most (the default order has six; a strategy that declines
# costs nothing, each other failed try one recompute of the stage).
MAX_ATTEMPTS_PER_INCIDENT = 6


def shape_of(tree: Any) -> tuple[Any, list[Any]]:
    """Structure, shapes and dtypes of a module output: what a fix must not change."""
    leaves, spec = pytree.tree_flatten(tree)
    return spec, [
        (leaf.shape, leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf) for leaf in leaves
    ]


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclasses.dataclass(frozen=True)
class StageCall:
    """A stage component's call that overflowed: the very inputs to recompute it with."""

    stage_name: str
    component_name: str
    step: int | None
    module: nn.Module
    args: tuple
    kwargs: dict
    output_shape: tuple[Any, list[Any]]
    watch: StreamWatch
    # The contents of the lists and dicts among the inputs before the call: each re-run starts from them.
    arguments: ArgumentState


@dataclasses.dataclass(eq=False)
class _Trial:
    """A fix that held: the stage output it gave, the next overflow (if any), how faithful it measured."""

    strategy: RecoveryStrategy
    fix: Fix
    params: dict[str, Any]
    location: Location
    output: Any
    following: Location | None
    measurement: Measurement
    attempt: Attempt
    snapshot: StructureSnapshot

    def rank(self) -> float:
        """Lower is more faithful; an unmeasured fix ranks after every measured one."""
        error = self.measurement.error
        return math.inf if error is None or math.isnan(error) else error


def _overflows_within(following: Location, location: Location, fix: Fix) -> bool:
    """Whether the next overflow is the one just fixed, or inside the region the fix changed."""
    name = following.module_name
    return name == location.module_name or name == fix.module_name or name.startswith(fix.module_name + ".")


def _note_restored(attempt: Attempt, restored: list[str]) -> None:
    if restored:
        attempt.detail = "; ".join(filter(None, [attempt.detail, *restored]))


@dataclasses.dataclass
class Settler:
    """The guard's strategies, settings and fixes, put to work on one incident at a time.

    ``relocate`` diagnoses a stage call again (for the next overflow after a fix); ``before_fix``
    runs before any strategy changes the model; ``failure`` builds the call's ``NonFiniteError``.
    """

    strategies: Sequence[RecoveryStrategy]
    options: GuardOptions
    ledger: FixLedger
    lookup: ModuleLookup
    relocate: Callable[[StageCall], Location]
    before_fix: Callable[[], None]
    failure: Callable[[str], NonFiniteError]

    def settle(self, incident: Incident, location: Location, call: StageCall) -> tuple[Any, Location | None]:
        """Try strategies until a fix is within tolerance: the recomputed output and the next overflow."""
        candidates: list[_Trial] = []
        for strategy in self.strategies[:MAX_ATTEMPTS_PER_INCIDENT]:
            attempt = Attempt(strategy.name)
            incident.attempts.append(attempt)
            trial = self._trial(strategy, location, call, attempt)
            if trial is None:
                continue
            error = trial.measurement.error
            if error is not None and error <= self.options.tolerance:
                attempt.outcome = "applied"
                return self._keep(trial, incident)
            attempt.outcome = "degraded" if error is not None else "unmeasured"
            attempt.detail = trial.measurement.detail or (
                f"error {error:.2g} against float32 exceeds the tolerance {self.options.tolerance:.2g}"
            )
            candidates.append(trial)
            self.ledger.revert([trial.fix])
            _note_restored(attempt, trial.snapshot.restore())
        best = min(candidates, key=_Trial.rank, default=None)
        if best is not None and self.options.fidelity == "best":
            return self._keep_degraded(best, incident)
        tried = ", ".join(f"{a.strategy} {a.outcome}" for a in incident.attempts)
        if best is not None:
            incident.detail = f"no fix came within tolerance of float32 ({tried}; guard_fidelity='strict')"
        else:
            incident.detail = (
                f"no strategy could fix it ({tried})" if tried else "no recovery strategy is enabled"
            )
        raise self._unrecovered(incident)

    def _unrecovered(self, incident: Incident) -> NonFiniteError:
        return self.failure(f"Could not recover {incident.stage} at {incident.module}: {incident.detail}.")

    def _trial(
        self, strategy: RecoveryStrategy, location: Location, call: StageCall, attempt: Attempt
    ) -> _Trial | None:
        """Apply one strategy's fix, recompute the stage, check it holds, measure it; ``None`` if it fails."""
        snapshot = StructureSnapshot.take(call.module)
        bytes_before = tensor_bytes([call.module])
        fix = self._attempt(strategy, location, attempt, snapshot)
        if fix is None:
            return None
        attempt.extra_bytes = tensor_bytes([call.module]) - bytes_before
        if location.memory_budget is not None and attempt.extra_bytes > location.memory_budget:
            detail = f"it adds {attempt.extra_bytes} bytes; {location.memory_budget} are left in the budget"
            self._reject(fix, attempt, snapshot, "over budget", detail)
            return None
        call.watch.take()  # block peaks from the strategy's own trial runs are not the recompute's
        with capturing(location.calls) as captured:
            try:
                call.arguments.restore()
                output = eager_call(call.module, call.args, call.kwargs)  # hooks fire, as eager does
            except Exception as error:
                self._reject(fix, attempt, snapshot, "raised", f"the recompute raised {error_text(error)}")
                return None
        if shape_of(output) != call.output_shape:
            self._reject(fix, attempt, snapshot, "invalid", "the fix changed the output's shape or dtype")
            return None
        try:
            following = None if stage_verdict(output, call.watch.take()) is None else self.relocate(call)
        except NonFiniteError as error:  # still flagged, but a diagnostic re-run finds nothing to name
            self._reject(fix, attempt, snapshot, "not held", str(error))
            return None
        if following is not None and _overflows_within(following, location, fix):
            self._reject(fix, attempt, snapshot, "not held", f"{following.module_name} is still overflowing")
            return None
        params = fix.describe()
        measurement = self._measure_lifted(fix, location, captured)
        try:
            fix = self._reapply(strategy, fix.module_name, params, location)
        except Exception as error:
            attempt.outcome = "raised"
            attempt.detail = f"re-applying it after its measurement raised {error_text(error)}"
            _note_restored(attempt, snapshot.restore())
            return None
        self.ledger.remember(fix)
        attempt.error = measurement.error
        return _Trial(strategy, fix, params, location, output, following, measurement, attempt, snapshot)

    def _reapply(
        self, strategy: RecoveryStrategy, module_name: str, params: dict[str, Any], location: Location
    ) -> Fix:
        """The same fix again: from its description (``apply``), or by a new ``recover`` where none."""
        fix = (
            strategy.apply(module_name, params, self.lookup)
            if callable(getattr(strategy, "apply", None))
            else strategy.recover(location)
        )
        if not isinstance(fix, Fix):
            raise TypeError(f"{strategy.name} did not re-create its fix (got {type(fix).__name__})")
        return fix

    def _measure_lifted(self, fix: Fix, location: Location, captured: Captured) -> Measurement:
        """Measure ``fix`` against float32 with the fix lifted, so the reference is the unfixed model."""
        changed = tuple(getattr(fix, "changed_modules", None) or (fix.module_name,))
        self.ledger.revert([fix])
        try:
            return measure(location.calls, captured, changed, self.ledger.budget_bytes)
        except Exception as error:
            return Measurement(None, None, f"its measurement raised {error_text(error)}")

    def _keep(self, trial: _Trial, incident: Incident, degraded: bool = False) -> tuple[Any, Location | None]:
        incident.strategy, incident.fixed_module = trial.fix.strategy, trial.fix.module_name
        incident.error, incident.measured_module = trial.measurement.error, trial.measurement.module
        incident.extra_bytes = trial.attempt.extra_bytes or 0
        incident.recovered, incident.degraded = not degraded, degraded
        cost = FixInForce(trial.fix.strategy, trial.fix.module_name, incident.extra_bytes, incident.error)
        self.ledger.record(trial.fix, cost)
        following = trial.following
        if following is not None:  # located while this fix's cost was not yet on the books
            following = dataclasses.replace(following, memory_budget=self.ledger.budget_left())
        return trial.output, following

    def _keep_degraded(self, trial: _Trial, incident: Incident) -> tuple[Any, Location | None]:
        """Re-apply the most faithful finite fix (reverted while others were tried); report it degraded."""
        try:
            trial.fix = self._reapply(trial.strategy, trial.fix.module_name, trial.params, trial.location)
        except Exception as error:
            incident.detail = f"re-applying {trial.strategy.name}'s fix raised {error_text(error)}"
            raise self._unrecovered(incident) from error
        self.ledger.remember(trial.fix)
        incident.detail = trial.attempt.detail
        trial.attempt.detail += "; kept: the most faithful finite fix"
        return self._keep(trial, incident, degraded=True)

    def _attempt(
        self, strategy: RecoveryStrategy, location: Location, attempt: Attempt, snapshot: StructureSnapshot
    ) -> Fix | None:
        """One strategy's ``recover``; on failure the component's hooks and dtypes are put back."""
        self.before_fix()
        try:
            fix = strategy.recover(location)
        except Declined as reason:
            attempt.outcome, attempt.detail = "declined", str(reason)
            fix = None
        except Exception as error:
            attempt.outcome, attempt.detail = "raised", error_text(error)
            fix = None
        else:
            if fix is None:
                attempt.outcome = "declined"
            elif not isinstance(fix, Fix):
                attempt.outcome, attempt.detail = "invalid", f"returned {type(fix).__name__}, not a Fix"
                fix = None
        if fix is None:
            _note_restored(attempt, snapshot.restore())
            return None
        self.ledger.remember(fix)
        return fix

    def _reject(
        self, fix: Fix, attempt: Attempt, snapshot: StructureSnapshot, outcome: str, detail: str
    ) -> None:
        """Undo a fix that did not hold, and whatever its ``revert()`` left behind."""
        attempt.outcome, attempt.detail = outcome, detail
        self.ledger.revert([fix])
        _note_restored(attempt, snapshot.restore())
