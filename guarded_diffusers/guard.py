"""The guard loop: check -> locate -> recover -> recompute -> remember.

During a pipeline call the guard hangs one forward hook on each stage's component. The hook
reads one device-side absmax per call; only when it is non-finite does the guard diagnose
(``locate``), ask the strategies for a fix in order, and re-run that component with the very
inputs it got, so a failed denoising step is recomputed before the scheduler ever sees it. A
fix that raises, changes the output's shape or dtype, or leaves the same module non-finite is
undone and the next strategy tries. Fixes stay for later steps and calls until ``reset()``; a
call that raises leaves the model exactly as it was before the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn
from torch.utils import _pytree as pytree

from .casting import module_dtype, tensor_bytes
from .checks import host_absmax
from .locate import Location, locate_first_overflow
from .measure import Captured, Measurement, capturing, measure
from .options import GuardOptions
from .plan import PlanEntry, PrecisionPlan
from .plan_apply import (
    PARAMETER_ERRORS,
    PendingEntry,
    PlanSource,
    Rollback,
    as_plan,
    check_size,
    misfit,
    pending_entries,
    touched_modules,
)
from .plugins import plugin_manager, registered_strategies
from .recovery import Declined, Fix, RecoveryStrategy
from .report import Attempt, DegradedFixWarning, FixInForce, GuardReport, Incident, NonFiniteError
from .state import StructureSnapshot
from .stream import StreamWatch, stage_verdict

# Under diffusers' logger, so diffusers.utils.logging.set_verbosity_*() and its handlers apply.
logger = logging.get_logger(f"diffusers.{__name__}")

# Incidents one stage call may raise before the guard gives up on it (each is a new module).
MAX_INCIDENTS_PER_CALL = 8
# Strategies tried per incident at most (the default order has five; a strategy that declines
# costs nothing, each other failed try one recompute of the stage).
MAX_ATTEMPTS_PER_INCIDENT = 5


@dataclasses.dataclass(frozen=True)
class Stage:
    """A checked stage: the name reported in incidents and the component path it runs."""

    name: str
    component: str
    counts_steps: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("pooled_prompt_embeds", "text_encoder"),
    Stage("prompt_embeds", "text_encoder_2"),
    Stage("vae_encode", "vae.encoder"),
    Stage("denoise", "transformer", counts_steps=True),
    Stage("vae_decode", "vae.decoder"),
)
_COMPONENTS = tuple(dict.fromkeys(stage.component.split(".")[0] for stage in STAGES))
# The stage that checks latents after each scheduler step; no module to fix there.
SCHEDULER_STAGE = "scheduler_step"


def _resolve(pipeline: Any, path: str) -> nn.Module | None:
    target = pipeline
    for attr in path.split("."):
        target = getattr(target, attr, None)
    return target if isinstance(target, nn.Module) else None


def _shape_of(tree: Any) -> tuple[Any, list[Any]]:
    """Structure, shapes and dtypes of a module output: what a fix must not change."""
    leaves, spec = pytree.tree_flatten(tree)
    return spec, [
        (leaf.shape, leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf) for leaf in leaves
    ]


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class Guard:
    """Watches one pipeline's components; holds the fixes applied so far and the last report."""

    def __init__(
        self, pipeline: Any, strategies: Sequence[RecoveryStrategy], options: GuardOptions | None = None
    ) -> None:
        self._pipeline = pipeline
        self.strategies = list(strategies)
        self.options = options or GuardOptions()
        self.fixes: list[Fix] = []
        self.last_report: GuardReport | None = None
        self._working_dtypes: dict[str, torch.dtype | None] = {}
        self._report = GuardReport()
        self._fixes_this_call: list[Fix] = []
        self._step = 0
        self._recovering = False
        self._in_force: dict[int, FixInForce] = {}  # cost and fidelity of each held fix, by id
        self._watches: dict[int, tuple[nn.Module, StreamWatch]] = {}
        components = [module for module in pipeline.components.values() if isinstance(module, nn.Module)]
        self._budget_bytes = self.options.budget_bytes(tensor_bytes(components))

    # -- public -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Revert every fix, newest first (plan fixes too): each module returns to its loaded state."""
        self._revert(self.fixes)

    def working_dtype(self, component: str) -> torch.dtype | None:
        """The dtype ``component`` reported before any fix changed it."""
        if self.fixes and component in self._working_dtypes:
            return self._working_dtypes[component]
        module = _resolve(self._pipeline, component)
        return module_dtype(module) if module is not None else None

    def module(self, name: str) -> nn.Module:
        """The module a qualified name (``transformer.single_transformer_blocks.0``) refers to."""
        component, _, path = name.partition(".")
        root = getattr(self._pipeline, component, None) if component in _COMPONENTS else None
        if not isinstance(root, nn.Module):
            raise KeyError(f"{name}: the pipeline has no component {component!r}")
        try:
            return root.get_submodule(path)
        except AttributeError:
            raise KeyError(f"{name}: {component} has no submodule {path!r}") from None

    def plan(self) -> PrecisionPlan:
        """The fixes held now, as a plan that ``guard_plan=`` re-applies before the first step."""
        return PrecisionPlan(
            tuple(
                PlanEntry(
                    fix.strategy, fix.module_name, type(self.module(fix.module_name)).__name__, fix.describe()
                )
                for fix in self.fixes
            )
        )

    def apply_plan(self, plan: PlanSource) -> None:
        """Apply every fix of ``plan`` (a ``PrecisionPlan`` or a plan file's path), or none of them.

        Every entry is checked against this pipeline before any tensor changes, and an entry equal
        to a fix the guard holds is skipped, so applying a plan twice changes nothing. If a
        strategy's ``apply`` fails half-way, weights, dtypes and hooks are put back from copies.
        ``ValueError`` naming the plan, the fix and the field for anything that does not fit.
        """
        plan = as_plan(plan)
        components = [c for name in _COMPONENTS if (c := _resolve(self._pipeline, name)) is not None]
        module_count = sum(1 for component in components for _ in component.modules())
        check_size(plan, module_count)
        strategies = registered_strategies()
        plan.check(strategies)
        pending = pending_entries(plan, strategies, self.module, self.plan().entries, module_count)
        if not pending:
            return
        touched = [module for item in pending for module in touched_modules(item.entry, self.module)]
        rollback = Rollback(components, touched)
        self._note_working_dtypes()
        applied: list[Fix] = []
        costs: list[FixInForce] = []
        budget = self._budget_left()
        try:
            for item in pending:
                before = tensor_bytes(components)
                applied.append(self._apply_entry(plan, item))
                added = tensor_bytes(components) - before
                costs.append(FixInForce(item.entry.strategy, item.entry.module, added))
                total = sum(cost.extra_bytes for cost in costs)
                if total > budget:
                    problem = (
                        f"the plan's fixes add {total} bytes; {budget} are left (guard_max_extra_memory)"
                    )
                    raise misfit(plan, item.index, item.entry, "strategy", problem)
        except BaseException:
            rollback.restore(applied)
            raise
        self.fixes.extend(applied)
        self._in_force.update((id(fix), cost) for fix, cost in zip(applied, costs, strict=True))

    def in_force(self) -> list[FixInForce]:
        """The fixes held now, oldest first, with the memory each adds and how faithful it measured."""
        return [
            self._in_force.get(id(fix)) or FixInForce(fix.strategy, fix.module_name, 0) for fix in self.fixes
        ]

    def _budget_left(self) -> int:
        return self._budget_bytes - sum(cost.extra_bytes for cost in self.in_force())

    @contextlib.contextmanager
    def watching(self) -> Iterator[GuardReport]:
        """Check every stage for the duration of one pipeline call; roll back on any exception."""
        self._report = GuardReport()
        self._fixes_this_call = []
        self._step = 0
        handles = []
        for stage in STAGES:
            module = _resolve(self._pipeline, stage.component)
            if module is not None:
                watch = self._stream_watch(module)
                handles += watch.install()
                handles.append(module.register_forward_hook(self._stage_hook(stage, watch), with_kwargs=True))
        try:
            yield self._report
        except BaseException:
            self._revert(self._fixes_this_call)
            raise
        else:
            if self._report.degraded:
                warnings.warn(
                    DegradedFixWarning(
                        "guarded_diffusers: no fix came within tolerance of float32 for "
                        f"{', '.join(i.module or i.stage for i in self._report.incidents if i.degraded)}; "
                        "the image is finite but may differ from float32's. See `guard_report`."
                    ),
                    stacklevel=4,  # the caller of the pipeline: watching, contextlib, __call__
                )
        finally:
            for handle in handles:
                handle.remove()
            self._report.fixes = self.in_force()
            self.last_report = self._report

    def check_latents(self, latents: torch.Tensor, step: int) -> None:
        """Raise if the scheduler produced non-finite latents: no module can be fixed there."""
        peak = host_absmax(latents)
        if math.isfinite(peak):
            return
        incident = Incident(
            SCHEDULER_STAGE, step, "scheduler", peak, detail="latents left the working dtype's range"
        )
        self._report.incidents.append(incident)
        self._settled(incident)
        raise self._failure(f"The scheduler produced non-finite latents at step {step}.")

    # -- the loop -------------------------------------------------------------------------------

    def _stream_watch(self, component: nn.Module) -> StreamWatch:
        """The block watch of ``component``, found once per component object."""
        held = self._watches.get(id(component))
        if held is None or held[0] is not component:
            held = self._watches[id(component)] = (component, StreamWatch(component))
        return held[1]

    def _stage_hook(self, stage: Stage, watch: StreamWatch) -> Callable[..., Any]:
        def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._recovering:
                return None
            step = self._step if stage.counts_steps else None
            self._step += stage.counts_steps
            if stage_verdict(output, watch.take()) is None:
                return None
            return self._recover(_StageCall(stage, step, module, args, kwargs, _shape_of(output), watch))

        return after_forward

    def _recover(self, call: _StageCall) -> Any:
        """Locate, fix and recompute until the stage's output is finite; raise if it cannot be."""
        self._recovering = True
        first = len(self._report.incidents)
        try:
            location: Location | None = self._locate(call)
            for _ in range(MAX_INCIDENTS_PER_CALL):
                incident = Incident(
                    call.stage.name, call.step, location.module_name, location.absmax, kind=location.kind
                )
                self._report.incidents.append(incident)
                output, location = self._settle(incident, location, call)
                if location is None:
                    return output
            raise self._failure(
                f"{call.stage.name} is still non-finite after {MAX_INCIDENTS_PER_CALL} recoveries."
            )
        finally:
            self._recovering = False
            for incident in self._report.incidents[first:]:
                self._settled(incident)

    def _locate(self, call: _StageCall) -> Location:
        location = locate_first_overflow(
            call.module, call.stage.component, call.args, call.kwargs, call.watch.blocks
        )
        call.watch.take()  # what the aborted re-run's blocks saw is not a stage verdict
        if location is None:
            raise self._failure(
                f"{call.stage.component} overflowed in {call.stage.name} but a diagnostic re-run did "
                "not reproduce it (non-deterministic kernels?)."
            )
        return dataclasses.replace(location, memory_budget=self._budget_left())

    def _settle(
        self, incident: Incident, location: Location, call: _StageCall
    ) -> tuple[Any, Location | None]:
        """Try strategies in order until a fix is within tolerance of float32; else keep the most faithful.

        Returns the recomputed stage output and the next overflow in it, if any.
        """
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
            attempt.detail = trial.measurement.detail or self._beyond_tolerance(error)
            candidates.append(trial)
            self._revert([trial.fix])
            self._note_restored(attempt, trial.snapshot.restore())
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
        return self._failure(f"Could not recover {incident.stage} at {incident.module}: {incident.detail}.")

    def _trial(
        self, strategy: RecoveryStrategy, location: Location, call: _StageCall, attempt: Attempt
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
                output = call.module(*call.args, **call.kwargs)
            except Exception as error:
                self._reject(fix, attempt, snapshot, "raised", f"the recompute raised {_error_text(error)}")
                return None
        if _shape_of(output) != call.output_shape:
            self._reject(fix, attempt, snapshot, "invalid", "the fix changed the output's shape or dtype")
            return None
        following = None if stage_verdict(output, call.watch.take()) is None else self._locate(call)
        if following is not None and _overflows_within(following, location, fix):
            self._reject(fix, attempt, snapshot, "not held", f"{following.module_name} is still non-finite")
            return None
        params = fix.describe()
        measurement = self._measure_lifted(fix, location, captured)
        try:
            fix = self._reapply(strategy, fix.module_name, params, location)
        except Exception as error:
            attempt.outcome = "raised"
            attempt.detail = f"re-applying it after its measurement raised {_error_text(error)}"
            self._note_restored(attempt, snapshot.restore())
            return None
        self._remember(fix)
        attempt.error = measurement.error
        return _Trial(strategy, fix, params, location, output, following, measurement, attempt, snapshot)

    def _reapply(
        self, strategy: RecoveryStrategy, module_name: str, params: dict[str, Any], location: Location
    ) -> Fix:
        """The same fix again: from its description (``apply``), or by a new ``recover`` where none."""
        fix = (
            strategy.apply(module_name, params, self.module)
            if callable(getattr(strategy, "apply", None))
            else strategy.recover(location)
        )
        if not isinstance(fix, Fix):
            raise TypeError(f"{strategy.name} did not re-create its fix (got {type(fix).__name__})")
        return fix

    def _measure_lifted(self, fix: Fix, location: Location, captured: Captured) -> Measurement:
        """Measure ``fix`` against float32 with the fix lifted, so the reference is the unfixed model."""
        changed = tuple(getattr(fix, "changed_modules", None) or (fix.module_name,))
        self._revert([fix])
        try:
            return measure(location.calls, captured, changed, self._budget_bytes)
        except Exception as error:
            return Measurement(None, None, f"its measurement raised {_error_text(error)}")

    def _keep(self, trial: _Trial, incident: Incident, degraded: bool = False) -> tuple[Any, Location | None]:
        incident.strategy, incident.fixed_module = trial.fix.strategy, trial.fix.module_name
        incident.error, incident.measured_module = trial.measurement.error, trial.measurement.module
        incident.extra_bytes = trial.attempt.extra_bytes or 0
        incident.recovered, incident.degraded = not degraded, degraded
        self._in_force[id(trial.fix)] = FixInForce(
            trial.fix.strategy, trial.fix.module_name, incident.extra_bytes, incident.error
        )
        return trial.output, trial.following

    def _keep_degraded(self, trial: _Trial, incident: Incident) -> tuple[Any, Location | None]:
        """Re-apply the most faithful finite fix (reverted while others were tried); report it degraded."""
        try:
            trial.fix = self._reapply(trial.strategy, trial.fix.module_name, trial.params, trial.location)
        except Exception as error:
            incident.detail = f"re-applying {trial.strategy.name}'s fix raised {_error_text(error)}"
            raise self._unrecovered(incident) from error
        self._remember(trial.fix)
        incident.detail = trial.attempt.detail
        trial.attempt.detail += "; kept: the most faithful finite fix"
        return self._keep(trial, incident, degraded=True)

    def _beyond_tolerance(self, error: float | None) -> str:
        return f"error {error:.2g} against float32 exceeds the tolerance {self.options.tolerance:.2g}"

    def _attempt(
        self, strategy: RecoveryStrategy, location: Location, attempt: Attempt, snapshot: StructureSnapshot
    ) -> Fix | None:
        """One strategy's ``recover``; on failure the component's hooks and dtypes are put back."""
        self._note_working_dtypes()
        try:
            fix = strategy.recover(location)
        except Declined as reason:
            attempt.outcome, attempt.detail = "declined", str(reason)
            fix = None
        except Exception as error:
            attempt.outcome, attempt.detail = "raised", _error_text(error)
            fix = None
        else:
            if fix is None:
                attempt.outcome = "declined"
            elif not isinstance(fix, Fix):
                attempt.outcome, attempt.detail = "invalid", f"returned {type(fix).__name__}, not a Fix"
                fix = None
        if fix is None:
            self._note_restored(attempt, snapshot.restore())
            return None
        self._remember(fix)
        return fix

    def _reject(
        self, fix: Fix, attempt: Attempt, snapshot: StructureSnapshot, outcome: str, detail: str
    ) -> None:
        """Undo a fix that did not hold, and whatever its ``revert()`` left behind."""
        attempt.outcome, attempt.detail = outcome, detail
        self._revert([fix])
        self._note_restored(attempt, snapshot.restore())

    @staticmethod
    def _note_restored(attempt: Attempt, restored: list[str]) -> None:
        if restored:
            attempt.detail = "; ".join(filter(None, [attempt.detail, *restored]))

    def _failure(self, message: str) -> NonFiniteError:
        return NonFiniteError(message, self._report)

    def _settled(self, incident: Incident) -> None:
        """Log a final incident and show it to observer plugins, whose errors cannot break the call."""
        logger.warning("guarded_diffusers: %s", incident.summary())
        arguments = {"incident": incident, "pipeline": self._pipeline}
        for observer in plugin_manager().hook.incident_recorded.get_hookimpls():
            try:
                observer.function(*(arguments[name] for name in observer.argnames))
            except Exception as error:
                logger.warning(
                    "guarded_diffusers: observer %s raised %s", observer.plugin_name, _error_text(error)
                )

    # -- state ------------------------------------------------------------------------------------

    def _apply_entry(self, plan: PrecisionPlan, item: PendingEntry) -> Fix:
        """One checked entry's ``apply``; an error of its parameters becomes the plan's ``ValueError``."""
        entry = item.entry
        try:
            fix = item.strategy.apply(entry.module, entry.params, self.module)
        except PARAMETER_ERRORS as error:
            raise misfit(plan, item.index, entry, "params", f"apply raised {_error_text(error)}") from error
        if not isinstance(fix, Fix):
            problem = f"apply returned {type(fix).__name__}, not a Fix"
            raise misfit(plan, item.index, entry, "strategy", problem)
        return fix

    def _note_working_dtypes(self) -> None:
        """Record each component's dtype before the first fix can change it."""
        if not self.fixes:
            self._working_dtypes = {name: self.working_dtype(name) for name in _COMPONENTS}

    def _remember(self, fix: Fix) -> None:
        self.fixes.append(fix)
        self._fixes_this_call.append(fix)

    def _revert(self, fixes: list[Fix]) -> None:
        """Revert ``fixes`` newest first (a fix may enclose an older one) and forget them."""
        undone = {id(fix) for fix in fixes}
        for fix in reversed(list(fixes)):
            fix.revert()
            self._in_force.pop(id(fix), None)
        self.fixes = [fix for fix in self.fixes if id(fix) not in undone]
        self._fixes_this_call = [fix for fix in self._fixes_this_call if id(fix) not in undone]


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


@dataclasses.dataclass(frozen=True)
class _StageCall:
    """A stage component's call that went non-finite: the very inputs to recompute it with."""

    stage: Stage
    step: int | None
    module: nn.Module
    args: tuple
    kwargs: dict
    output_shape: tuple[Any, list[Any]]
    watch: StreamWatch


def _overflows_within(following: Location, location: Location, fix: Fix) -> bool:
    """Whether the next overflow is the one just fixed, or inside the region the fix changed."""
    name = following.module_name
    return name == location.module_name or name == fix.module_name or name.startswith(fix.module_name + ".")
