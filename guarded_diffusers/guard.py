"""The guard loop: check -> locate -> recover -> recompute -> remember.

During a pipeline call the guard hangs one forward hook on each stage's component. The hook
reads one device-side absmax per call; only when it is non-finite does the guard diagnose
(``locate``), ask the strategies for a fix, and re-run that component with the very inputs
it got, so a failed denoising step is recomputed before the scheduler ever sees it. Fixes
stay for later steps and calls until ``reset()``; a call that raises leaves the model
exactly as it was before the call.
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

from .casting import module_dtype
from .checks import host_absmax
from .locate import Location, locate_first_non_finite
from .recovery import Fix, RecoveryStrategy
from .report import GuardReport, Incident, NonFiniteError

# Under diffusers' logger, so diffusers.utils.logging.set_verbosity_*() and its handlers apply.
logger = logging.get_logger(f"diffusers.{__name__}")

# Incidents one stage call may raise before the guard gives up on it (each is a new module).
MAX_INCIDENTS_PER_CALL = 8


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


class Guard:
    """Watches one pipeline's components; holds the fixes applied so far and the last report."""

    def __init__(self, pipeline: Any, strategies: Sequence[RecoveryStrategy]) -> None:
        self._pipeline = pipeline
        self.strategies = list(strategies)
        self.fixes: list[Fix] = []
        self.last_report: GuardReport | None = None
        self._working_dtypes: dict[str, torch.dtype | None] = {}
        self._report = GuardReport()
        self._fixes_this_call: list[Fix] = []
        self._step = 0
        self._recovering = False

    # -- public -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Revert every fix, newest first: each module returns to its original dtype, bit for bit."""
        self._revert(self.fixes)

    def working_dtype(self, component: str) -> torch.dtype | None:
        """The dtype ``component`` reported before any fix changed it."""
        if self.fixes and component in self._working_dtypes:
            return self._working_dtypes[component]
        module = _resolve(self._pipeline, component)
        return module_dtype(module) if module is not None else None

    @contextlib.contextmanager
    def watching(self) -> Iterator[GuardReport]:
        """Check every stage for the duration of one pipeline call; roll back on any exception."""
        self._report = GuardReport()
        self._fixes_this_call = []
        self._step = 0
        if not self.fixes:
            self._working_dtypes = {name: self.working_dtype(name) for name in _COMPONENTS}
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
        logger.warning("guarded_diffusers: %s", incident.summary())
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
            return self._recover(stage, step, module, args, kwargs)

        return after_forward

    def _recover(self, stage: Stage, step: int | None, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Locate, fix and recompute until ``module``'s output is finite; raise if it cannot be."""
        self._recovering = True
        first = len(self._report.incidents)
        try:
            for _ in range(MAX_INCIDENTS_PER_CALL):
                self._fix_first_non_finite(stage, step, module, args, kwargs, since=first)
                output = module(*args, **kwargs)
                if math.isfinite(host_absmax(output)):
                    for incident in self._report.incidents[first:]:
                        incident.recovered = True
                    return output
            raise self._failure(
                f"{stage.name} is still non-finite after {MAX_INCIDENTS_PER_CALL} recoveries."
            )
        finally:
            self._recovering = False
            for incident in self._report.incidents[first:]:
                logger.warning("guarded_diffusers: %s", incident.summary())

    def _fix_first_non_finite(
        self, stage: Stage, step: int | None, module: nn.Module, args: tuple, kwargs: dict, since: int
    ) -> None:
        """Diagnose one incident, record it and apply the first fix a strategy offers."""
        location = locate_first_non_finite(module, stage.component, args, kwargs)
        if location is None:
            raise self._failure(
                f"{stage.component} produced a non-finite {stage.name} but a diagnostic re-run did not "
                "reproduce it (non-deterministic kernels?)."
            )
        earlier = self._report.incidents[since:]
        incident = Incident(stage.name, step, location.module_name, location.absmax)
        self._report.incidents.append(incident)
        if any(previous.module == incident.module for previous in earlier):
            incident.detail = f"the fix by {earlier[-1].strategy} on {earlier[-1].fixed_module} did not hold"
            raise self._failure(f"Could not recover {stage.name}: {incident.detail}.")
        self._apply_first_fix(incident, location)

    def _failure(self, message: str) -> NonFiniteError:
        return NonFiniteError(message, self._report)

    def _apply_first_fix(self, incident: Incident, location: Location) -> None:
        for strategy in self.strategies:
            fix = strategy.recover(location)
            if fix is not None:
                self._remember(fix)
                incident.strategy, incident.fixed_module = fix.strategy, fix.module_name
                return
        incident.detail = "no strategy could fix it"
        raise self._failure(f"No recovery strategy could fix {incident.module}.")

    # -- state ------------------------------------------------------------------------------------

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
