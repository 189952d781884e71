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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn
from torch.utils import _pytree as pytree

from .casting import module_dtype
from .checks import host_absmax
from .locate import Location, locate_first_non_finite
from .options import GuardOptions
from .plan import PlanEntry, PrecisionPlan
from .plugins import plugin_manager, registered_strategies
from .recovery import Fix, RecoveryStrategy
from .report import Attempt, GuardReport, Incident, NonFiniteError
from .state import StructureSnapshot

# Under diffusers' logger, so diffusers.utils.logging.set_verbosity_*() and its handlers apply.
logger = logging.get_logger(f"diffusers.{__name__}")

# Incidents one stage call may raise before the guard gives up on it (each is a new module).
MAX_INCIDENTS_PER_CALL = 8
# Strategies tried per incident at most; each failed try costs one recompute of the stage.
MAX_ATTEMPTS_PER_INCIDENT = 4


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

    def apply_plan(self, plan: PrecisionPlan) -> None:
        """Apply every fix of ``plan``, or none: ``ValueError`` if it does not fit this pipeline."""
        strategies = registered_strategies()
        plan.check_strategies(strategies)
        self._note_working_dtypes()
        applied: list[Fix] = []
        try:
            for entry in plan.entries:
                applied.append(self._apply_entry(entry, strategies[entry.strategy]))
        except BaseException:
            for fix in reversed(applied):
                fix.revert()
            raise
        self.fixes.extend(applied)

    @contextlib.contextmanager
    def watching(self) -> Iterator[GuardReport]:
        """Check every stage for the duration of one pipeline call; roll back on any exception."""
        self._report = GuardReport()
        self._fixes_this_call = []
        self._step = 0
        handles = [
            module.register_forward_hook(self._stage_hook(stage), with_kwargs=True)
            for stage in STAGES
            if (module := _resolve(self._pipeline, stage.component)) is not None
        ]
        try:
            yield self._report
        except BaseException:
            self._revert(self._fixes_this_call)
            raise
        finally:
            for handle in handles:
                handle.remove()
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

    def _stage_hook(self, stage: Stage) -> Callable[..., Any]:
        def after_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._recovering:
                return None
            step = self._step if stage.counts_steps else None
            self._step += stage.counts_steps
            if math.isfinite(host_absmax(output)):
                return None
            return self._recover(_StageCall(stage, step, module, args, kwargs, _shape_of(output)))

        return after_forward

    def _recover(self, call: _StageCall) -> Any:
        """Locate, fix and recompute until the stage's output is finite; raise if it cannot be."""
        self._recovering = True
        first = len(self._report.incidents)
        try:
            location: Location | None = self._locate(call)
            for _ in range(MAX_INCIDENTS_PER_CALL):
                incident = Incident(call.stage.name, call.step, location.module_name, location.absmax)
                self._report.incidents.append(incident)
                output, location = self._settle(incident, location, call)
                if location is None:
                    for settled in self._report.incidents[first:]:
                        settled.recovered = True
                    return output
            raise self._failure(
                f"{call.stage.name} is still non-finite after {MAX_INCIDENTS_PER_CALL} recoveries."
            )
        finally:
            self._recovering = False
            for incident in self._report.incidents[first:]:
                self._settled(incident)

    def _locate(self, call: _StageCall) -> Location:
        location = locate_first_non_finite(call.module, call.stage.component, call.args, call.kwargs)
        if location is None:
            raise self._failure(
                f"{call.stage.component} produced a non-finite {call.stage.name} but a diagnostic re-run did "
                "not reproduce it (non-deterministic kernels?)."
            )
        return location

    def _settle(
        self, incident: Incident, location: Location, call: _StageCall
    ) -> tuple[Any, Location | None]:
        """Try strategies in order until a fix holds; returns the recomputed output and the next overflow."""
        for strategy in self.strategies[:MAX_ATTEMPTS_PER_INCIDENT]:
            attempt = Attempt(strategy.name)
            incident.attempts.append(attempt)
            snapshot = StructureSnapshot.take(call.module)
            fix = self._attempt(strategy, location, attempt, snapshot)
            if fix is None:
                continue
            try:
                output = call.module(*call.args, **call.kwargs)
            except Exception as error:
                self._reject(fix, attempt, snapshot, "raised", f"the recompute raised {_error_text(error)}")
                continue
            if _shape_of(output) != call.output_shape:
                self._reject(fix, attempt, snapshot, "invalid", "the fix changed the output's shape or dtype")
                continue
            following = None if math.isfinite(host_absmax(output)) else self._locate(call)
            if following is not None and _overflows_within(following, location, fix):
                self._reject(
                    fix, attempt, snapshot, "not held", f"{following.module_name} is still non-finite"
                )
                continue
            attempt.outcome = "applied"
            incident.strategy, incident.fixed_module = fix.strategy, fix.module_name
            return output, following
        tried = ", ".join(f"{a.strategy} {a.outcome}" for a in incident.attempts)
        incident.detail = (
            f"no strategy could fix it ({tried})" if tried else "no recovery strategy is enabled"
        )
        raise self._failure(f"Could not recover {incident.stage} at {incident.module}: {incident.detail}.")

    def _attempt(
        self, strategy: RecoveryStrategy, location: Location, attempt: Attempt, snapshot: StructureSnapshot
    ) -> Fix | None:
        """One strategy's ``recover``; on failure the component's hooks and dtypes are put back."""
        self._note_working_dtypes()
        try:
            fix = strategy.recover(location)
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

    def _apply_entry(self, entry: PlanEntry, strategy: RecoveryStrategy) -> Fix:
        try:
            module = self.module(entry.module)
        except KeyError as error:
            raise ValueError(f"The precision plan does not fit this pipeline: {error.args[0]}.") from None
        if type(module).__name__ != entry.module_class:
            raise ValueError(
                f"The precision plan does not fit this pipeline: {entry.module} is a {type(module).__name__} "
                f"here but a {entry.module_class} in the plan (made for another model?)."
            )
        try:
            return strategy.apply(entry.module, entry.params, self.module)
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"The precision plan's {entry.strategy} fix on {entry.module} does not fit: {error}"
            ) from None

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
        self.fixes = [fix for fix in self.fixes if id(fix) not in undone]
        self._fixes_this_call = [fix for fix in self._fixes_this_call if id(fix) not in undone]


@dataclasses.dataclass(frozen=True)
class _StageCall:
    """A stage component's call that went non-finite: the very inputs to recompute it with."""

    stage: Stage
    step: int | None
    module: nn.Module
    args: tuple
    kwargs: dict
    output_shape: tuple[Any, list[Any]]


def _overflows_within(following: Location, location: Location, fix: Fix) -> bool:
    """Whether the next overflow is the one just fixed, or inside the region the fix changed."""
    name = following.module_name
    return name == location.module_name or name == fix.module_name or name.startswith(fix.module_name + ".")
