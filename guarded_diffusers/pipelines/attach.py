"""``guard(pipe)`` and ``unguard(pipe)``: guard a pipeline already loaded, in place, and take it back.

The instance's class becomes the guarded subclass of its own class (a named one, or a
``Guarded<Class>`` made once and cached), so every ``isinstance`` check on it still holds and
its components and config are the very same objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from diffusers import DiffusionPipeline

from ..core.options import Fidelity, GuardOptions
from . import classes, flux_fill  # noqa: F401  (defining the named classes registers them for guarded_class)
from .guarded import GuardedPipeline, GuardPlanArgument, guard_settings, guarded_class
from .operations import release_components

Pipeline = TypeVar("Pipeline", bound=DiffusionPipeline)


def guard(
    pipe: Pipeline,
    strategies: Sequence[str] | None = None,
    plan: GuardPlanArgument = None,
    fidelity: Fidelity = "best",
    tolerance: float = GuardOptions.tolerance,
    max_extra_memory: float | int = GuardOptions.max_extra_memory,
) -> Pipeline:
    """Guard ``pipe`` in place and return it; the settings mean what ``from_pretrained``'s ``guard_*`` do.

    Every setting is checked before anything changes. Guarding a guarded pipeline again returns it
    as it is when no setting is given, and is a ``ValueError`` otherwise: its fixes were measured
    under its settings, so ``unguard(pipe)`` first.
    """
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"`pipe` must be a diffusers pipeline, not {type(pipe).__name__}.")
    settings = guard_settings(strategies, plan, fidelity, tolerance, max_extra_memory)
    if isinstance(pipe, GuardedPipeline) and "guard" in pipe.__dict__:
        defaults = (None, None, "best", GuardOptions.tolerance, GuardOptions.max_extra_memory)
        if (strategies, plan, fidelity, tolerance, max_extra_memory) != defaults:
            raise ValueError(
                f"`pipe` is a {type(pipe).__name__} already; call unguard(pipe) before guarding it with "
                "other settings."
            )
        return pipe
    original = type(pipe)
    pipe.__class__ = guarded_class(original)
    try:
        pipe._install_guard(*settings)  # type: ignore[attr-defined]
    except BaseException:
        pipe.__class__ = original
        raise
    return pipe


def unguard(pipe: Pipeline) -> Pipeline:
    """Revert every fix of ``pipe`` exactly, remove its guard and give it back its diffusers class."""
    if not isinstance(pipe, GuardedPipeline):
        return pipe
    held = pipe.__dict__.pop("guard", None)
    if held is not None:
        held.reset()
        release_components(pipe, held)
    pipe.__class__ = pipe.guarded_base
    return pipe
