"""Run one zero-code item: fuzz a (variant or LoRA, dtype, mode) with hypothesis and explain the failures.

Each example runs from the saved weights: the guard's fixes are reset after every guarded call,
so an example fails or passes the same way whenever hypothesis replays it while shrinking. A raw
example runs behind a detect-only guard, which fails it on the first overflow: a NaN or inf, or a
residual stream at the dtype's maximum, where diffusers and transformers clip and the image stays
finite but wrong. The rest of a raw failure's explanation (the plain pipeline's pixels, black or
silently clipped, and what the full guard makes of it) runs once, on the shrunk example.

The search is targeted: every example reports each component's peak over the dtype's maximum to
``hypothesis.target()``, so hypothesis climbs towards the inputs that come closest to overflowing.
Each offending module raises its own failure class, so two modules that overflow on different
inputs are two failures, each shrunk and reported.
"""

from __future__ import annotations

import pytest
from hypothesis import Verbosity, given

from .artifacts import folder_for, save_failure
from .baked import BakedCheck
from .budget import BudgetSpent, ShrinkBudget
from .calls import call_shape
from .checks import GuardedCheck, RawCheck
from .failures import ExampleFailed, FluxGuardFailure
from .inputs import FillInputs
from .options import FluxGuardOptions
from .pipelines import LoRAUnavailable, PipelineCache
from .profile import fluxguard_settings
from .quiet import quiet_libraries
from .reproducible import reproducible_search
from .search import item_max_guidance, item_strategy, target_peaks
from .summary import ItemStats
from .target import Target

_CHECKS = {"raw": RawCheck, "guarded": GuardedCheck, "baked": BakedCheck}


def run_item(
    item: pytest.Item, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats
) -> None:
    """Fuzz ``target`` for ``options.examples`` examples; raise FluxGuardFailure with the minimal failures."""
    with quiet_libraries():
        try:
            _run_item(item, target, options, pipelines, stats)
        except LoRAUnavailable as error:
            pytest.fail(str(error), pytrace=False)


def _run_item(
    item: pytest.Item, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats
) -> None:
    check = _CHECKS[target.mode](target, options, pipelines, stats)
    pipe = check.pipeline(guarded=False)
    try:
        strategy = item_strategy(pipe, options, target)
    except ValueError as error:
        pytest.fail(str(error), pytrace=False)
    stats.guidance_limit = item_max_guidance(options, target, call_shape(pipe).embeds_guidance)[1]
    budget = ShrinkBudget(options.max_shrinks)

    def run_example(example: FillInputs) -> None:
        known = budget.known(example)
        if known is not None:
            failure = known
        else:
            budget.spend()
            stats.examples += 1
            failure = None
            try:
                peaks = check(example)
            except ExampleFailed as caught:
                failure = caught
            if failure is None:
                stats.note_peaks(peaks)
                target_peaks(peaks)
                return
            stats.failures += 1
            budget.failed(example, failure)
        # One raise for every failure, outside any except block: hypothesis tells failures apart by
        # exception type and where (and from what) it was raised, so a replay must raise here too.
        raise type(failure)(failure.problem, failure.example, failure.images, failure.report)

    # A database key per item, as hypothesis' pytest plugin gives each parametrized case.
    run_example._hypothesis_internal_add_digest = item.nodeid.encode()  # type: ignore[attr-defined]
    # Quiet: hypothesis would print its own notes (slow shrinking, target scores) into the item's output.
    settings = fluxguard_settings(item.config.rootpath, options.examples, verbosity=Verbosity.quiet)
    test = given(example=strategy)(settings(run_example))
    try:
        with reproducible_search():
            test()
    except BudgetSpent:
        failures = budget.smallest()
    except Exception as error:  # one ExampleFailed, or a group of distinct ones, each shrunk
        failures = _example_failures(error)
        if failures is None:
            raise
    else:
        return
    raise FluxGuardFailure(_explain(item, options, check, failures))


def _example_failures(error: BaseException) -> list[ExampleFailed] | None:
    """The ExampleFailed in ``error`` (an exception group's leaves too); None if anything else is there.

    Duck-typed: on Python 3.10 hypothesis raises the ``exceptiongroup`` backport's groups.
    """
    if isinstance(error, ExampleFailed):
        return [error]
    members = getattr(error, "exceptions", None)
    if not isinstance(members, tuple) or not members:
        return None
    found = [_example_failures(member) for member in members]
    if any(leaves is None for leaves in found):
        return None
    return [leaf for leaves in found for leaf in leaves or []]


def _explain(
    item: pytest.Item,
    options: FluxGuardOptions,
    check: RawCheck | GuardedCheck | BakedCheck,
    failures: list[ExampleFailed],
) -> str:
    """The first failure in full; others in two lines each (hypothesis replays them first next run)."""
    first, *others = failures
    explained = check.explain(first)
    saved = save_failure(folder_for(options.artifacts, item.name), first.example, explained.images)
    lines = [f"{item.name}: {explained.problem}", *explained.lines]
    lines += ["saved:", *(f"  {path}" for path in saved)]
    lines += ["shrunk example (replay: pipe(**example.pipeline_kwargs(), output_type='np')):"]
    lines += first.example.pretty().splitlines()
    if others:
        lines.append(f"{len(others)} more distinct failure(s), each shrunk, replayed first on the next run:")
        for other in others:
            lines += [f"  {other.problem}", f"    {other.example!r}"]
    return "\n".join(lines)
