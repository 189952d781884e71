"""The guard: check every stage of a pipeline call, locate an overflow, settle it, report.

During a pipeline call the guard hangs one forward hook on each stage's component, and one on
each of its residual-stream blocks. A component call costs one device-side absmax and one host
read; only when it is non-finite or saturated does the guard diagnose (``locate``), settle the
overflow with its strategies (``settle``) and re-run that component with the very inputs it got,
so a failed denoising step is recomputed before the scheduler ever sees it. Fixes stay for later
steps and calls until ``reset()`` (``ledger``); a call that raises leaves the model exactly as it
was before the call.
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

from .baked import baked_exponents
from .casting import module_dtype, tensor_bytes
from .checks import host_absmax
from .compiled import eager_module, is_compiled, watch_calls
from .context import current_call, entering
from .gate import admit, exclusive
from .ledger import FixLedger
from .locate import Location, locate_first_overflow
from .options import GuardOptions
from .plan import PlanEntry, PrecisionPlan
from .plan_apply import PlanSource, apply_entries, as_plan, check_size, pending_entries
from .plugins import plugin_manager, registered_strategies
from .recovery import Fix, RecoveryStrategy
from .replay import ArgumentState
from .report import DegradedFixWarning, FixInForce, GuardReport, Incident, NonFiniteError
from .settle import Settler, StageCall, error_text, shape_of
from .stages import SCHEDULER_STAGE, Stage, discover_stages, resolve_component, stage_components
from .stream import StreamWatch, residual_blocks, stage_verdict

# Under diffusers' logger, so diffusers.utils.logging.set_verbosity_*() and its handlers apply.
logger = logging.get_logger(f"diffusers.{__name__}")

# Incidents one stage call may raise before the guard gives up on it (each is a new module).
MAX_INCIDENTS_PER_CALL = 8


@dataclasses.dataclass(eq=False)
class _Call:
    """One guarded pipeline call: its report, step count and the fixes it made (for rollback)."""

    guard: Guard
    report: GuardReport
    step: int = 0
    recovering: bool = False
    fixes_made: list[Fix] = dataclasses.field(default_factory=list)


class Guard:
    """Watches one pipeline's components; holds the fixes applied so far and the last report."""

    def __init__(
        self, pipeline: Any, strategies: Sequence[RecoveryStrategy], options: GuardOptions | None = None
    ) -> None:
        self._pipeline = pipeline
        self.strategies = list(strategies)
        self.options = options or GuardOptions()
        self.last_report: GuardReport | None = None
        self._working_dtypes: dict[str, torch.dtype | None] = {}
        self._blocks: dict[int, tuple[nn.Module, list[nn.Module]]] = {}
        components = [module for module in pipeline.components.values() if isinstance(module, nn.Module)]
        self._ledger = FixLedger(self.options.budget_bytes(tensor_bytes(components)))
        for stage in self.stages:  # from now on, weights change only while no other forward runs
            if (module := resolve_component(pipeline, stage.component)) is not None:
                admit(module)

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages a call checks, from the pipeline's components as they are now."""
        return discover_stages(self._pipeline)

    @property
    def baked_exponents(self) -> dict[str, dict[str, int]]:
        """``{component: {tensor name: exponent}}`` of the components loaded from a baked folder: the
        powers of two already in their weights (``fluxguard bake``). Run-time fixes measure on them."""
        return baked_exponents(self._pipeline.components)

    @property
    def fixes(self) -> list[Fix]:
        """The fixes held now, oldest first (plan fixes too)."""
        return self._ledger.fixes

    # -- public -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Revert every fix, newest first (plan fixes too): each module returns to its loaded state."""
        self._ledger.revert(self.fixes)

    def revert(self, fixes: Sequence[Fix]) -> None:
        """Revert these held fixes, newest first, and forget them; the others stay."""
        self._ledger.revert(list(fixes))

    def working_dtype(self, component: str) -> torch.dtype | None:
        """The dtype ``component`` reported before any fix held now changed it."""
        if component in self._fixed_components() and component in self._working_dtypes:
            return self._working_dtypes[component]
        module = resolve_component(self._pipeline, component)
        return module_dtype(module) if module is not None else None

    def module(self, name: str) -> nn.Module:
        """The module a qualified name (``transformer.single_transformer_blocks.0``) refers to."""
        component, _, path = name.partition(".")
        root = getattr(self._pipeline, component, None) if component in self._components else None
        root = eager_module(root) if isinstance(root, nn.Module) else root
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
        components = [
            c for name in self._components if (c := resolve_component(self._pipeline, name)) is not None
        ]
        module_count = sum(1 for component in components for _ in component.modules())
        check_size(plan, module_count)
        strategies = registered_strategies()
        plan.check(strategies)
        pending = pending_entries(plan, strategies, self.module, self.plan().entries, module_count)
        if pending:
            self._note_working_dtypes()
            with exclusive():
                apply_entries(plan, pending, components, self.module, self._ledger)

    @contextlib.contextmanager
    def lifted(self) -> Iterator[PrecisionPlan]:
        """Revert every fix for the block (the weights as loaded), then re-apply them as they were.

        For what must see the model without fixes: saving it, or changing its modules. Yields the
        plan of the lifted fixes; they come back with their measured cost and error.
        """
        plan, costs = self.plan(), self.in_force()
        self.reset()
        try:
            yield plan
        finally:
            self.apply_plan(plan)
            self.restore_measured(costs)

    def restore_measured(self, measured: Sequence[FixInForce]) -> None:
        """Give fixes re-applied after a lift the cost and error they ``measured`` when they were
        made (matched by strategy and module): a plan carries neither."""
        self._ledger.restore_costs(list(measured))

    def in_force(self) -> list[FixInForce]:
        """The fixes held now, oldest first, with the memory each adds and how faithful it measured."""
        return self._ledger.in_force()

    @contextlib.contextmanager
    def watching(self, unchecked: Sequence[str] = ()) -> Iterator[GuardReport]:
        """Check every stage for the duration of one pipeline call; roll back on any exception.

        The hooks act only on this call (this thread): another pipeline sharing the components, or
        this one called from another thread, runs unwatched through them or with its own call.
        ``unchecked``: stages the caller cannot give the guard, named in the report.
        """
        call = _Call(self, GuardReport(unchecked=list(unchecked)))
        handles = []
        for stage in self.stages:
            module = resolve_component(self._pipeline, stage.component)
            if module is not None:
                admit(module)
                watch = StreamWatch(self._residual_blocks(module), lambda call=call: current_call() is call)
                handles += watch.install()
                handles.append(watch_calls(module, *self._stage_hooks(stage, watch, call)))
        try:
            with entering(call):
                yield call.report
        except BaseException:
            self._ledger.revert(call.fixes_made)
            raise
        else:
            if call.report.degraded:
                warnings.warn(
                    DegradedFixWarning(
                        "guarded_diffusers: no fix came within tolerance of float32 for "
                        f"{', '.join(i.module or i.stage for i in call.report.incidents if i.degraded)}; "
                        "the image is finite but may differ from float32's. See `guard_report`."
                    ),
                    stacklevel=5,  # the pipeline's caller: watching, contextlib, _guarded_call, __call__
                )
        finally:
            for handle in handles:
                handle.remove()
            call.report.fixes = self.in_force()
            call.report.baked = self.baked_exponents
            self.last_report = call.report

    def check_latents(self, latents: torch.Tensor, step: int) -> None:
        """Raise if the scheduler produced non-finite latents: no module can be fixed there."""
        peak = host_absmax(latents)
        if math.isfinite(peak):
            return
        incident = Incident(
            SCHEDULER_STAGE, step, "scheduler", peak, detail="latents left the working dtype's range"
        )
        report = self._current().report
        report.incidents.append(incident)
        self._settled(incident)
        raise self._failure(f"The scheduler produced non-finite latents at step {step}.")

    # -- the loop -------------------------------------------------------------------------------

    @property
    def _components(self) -> tuple[str, ...]:
        return stage_components(self.stages)

    def _residual_blocks(self, component: nn.Module) -> list[nn.Module]:
        """The blocks of ``component``, found once per component object; none under torch.compile
        (hooks inside compiled code would break its graph or make it recompile every call)."""
        held = self._blocks.get(id(component))
        if held is None or held[0] is not component:
            blocks = [] if is_compiled(component) else residual_blocks(component)
            held = self._blocks[id(component)] = (component, blocks)
        return held[1]

    def _current(self) -> _Call:
        call = current_call()
        if call is None or call.guard is not self:
            raise RuntimeError("guarded_diffusers: the guard was asked about a call it is not watching.")
        return call

    def _stage_hooks(
        self, stage: Stage, watch: StreamWatch, call: _Call
    ) -> tuple[Callable[..., Any], Callable[..., None]]:
        """The check after each call of the stage, and what records its inputs' containers before it."""
        before_call = [ArgumentState()]  # the containers' contents as the last call started

        def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if current_call() is call and not call.recovering:
                before_call[0] = ArgumentState.take(args, kwargs)

        def after_forward(module: nn.Module, args: tuple, *kwargs_and_output: Any) -> Any:
            # (kwargs, output), or (output,) from a thread that saw the hook half-registered
            if current_call() is not call or call.recovering:
                return None
            kwargs, output = kwargs_and_output if len(kwargs_and_output) == 2 else ({}, kwargs_and_output[0])
            step = call.step if stage.per_step else None
            call.step += stage.counts_steps
            if stage_verdict(output, watch.take()) is None:
                return None
            stage_call = StageCall(
                stage.name,
                stage.component,
                step,
                module,
                args,
                kwargs,
                shape_of(output),
                watch,
                before_call[0],
            )
            with exclusive():  # no other thread's forward runs while the model is diagnosed and fixed
                return self._recover(stage_call)

        return after_forward, before_forward

    def _recover(self, call: StageCall) -> Any:
        """Locate, fix and recompute until the stage's output is clean; raise if it cannot be."""
        state = self._current()
        state.recovering = True
        first = len(state.report.incidents)
        settler = Settler(
            self.strategies,
            self.options,
            self._ledger,
            self.module,
            self._locate,
            self._note_working_dtypes,
            self._failure,
        )
        try:
            location: Location | None = self._locate(call)
            for _ in range(MAX_INCIDENTS_PER_CALL):
                incident = Incident(
                    call.stage_name, call.step, location.module_name, location.absmax, kind=location.kind
                )
                state.report.incidents.append(incident)
                output, location = settler.settle(incident, location, call)
                if location is None:
                    return output
            raise self._failure(
                f"{call.stage_name} is still overflowing after {MAX_INCIDENTS_PER_CALL} recoveries."
            )
        finally:
            state.recovering = False
            for incident in state.report.incidents[first:]:
                self._settled(incident)

    def _locate(self, call: StageCall) -> Location:
        try:
            call.arguments.restore()
            location = locate_first_overflow(
                call.module, call.component_name, call.args, call.kwargs, call.watch.blocks
            )
        except Exception as error:  # the diagnosis never crashes the call: it becomes the report's incident
            detail = f"the diagnosis raised {error_text(error)}"
            self._current().report.incidents.append(
                Incident(call.stage_name, call.step, call.component_name, detail=detail)
            )
            raise self._failure(
                f"Could not diagnose {call.stage_name} in {call.component_name}: {detail}."
            ) from error
        finally:
            call.watch.take()  # what the aborted re-run's blocks saw is not a stage verdict
        if location is None:
            raise self._failure(
                f"{call.component_name} overflowed in {call.stage_name} but a diagnostic re-run did "
                "not reproduce it (non-deterministic kernels?)."
            )
        return dataclasses.replace(location, memory_budget=self._ledger.budget_left())

    def _fixed_components(self) -> set[str]:
        return {fix.module_name.partition(".")[0] for fix in self.fixes}

    def _note_working_dtypes(self) -> None:
        """Record the dtype of each component that no held fix changes, before the next fix can.

        A component whose fixes were all reverted is recorded anew, so a dtype the user chose since
        (``pipe.to(torch.float32)``) is the component's working dtype from then on.
        """
        fixed = self._fixed_components()
        for name in self._components:
            if name not in fixed:
                module = resolve_component(self._pipeline, name)
                self._working_dtypes[name] = module_dtype(module) if module is not None else None

    def _failure(self, message: str) -> NonFiniteError:
        return NonFiniteError(message, self._current().report)

    def _settled(self, incident: Incident) -> None:
        """Log a final incident and show it to observer plugins, whose errors cannot break the call."""
        logger.warning("guarded_diffusers: %s", incident.summary())
        arguments = {"incident": incident, "pipeline": self._pipeline}
        for observer in plugin_manager().hook.incident_recorded.get_hookimpls():
            try:
                observer.function(*(arguments[name] for name in observer.argnames))
            except Exception as error:
                logger.warning(
                    "guarded_diffusers: observer %s raised %s", observer.plugin_name, error_text(error)
                )
