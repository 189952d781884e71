"""Applying a precision plan: every entry checked against the pipeline first, then all applied or none.

A plan is untrusted input and a strategy may be third-party code, so ``Guard.apply_plan`` checks
each entry (module, class, the strategy's own ``validate``) before any tensor changes, skips
entries equal to a fix the guard already holds (a plan applied twice changes nothing), and keeps
host copies of what the entries touch, so a strategy that raises half-way is undone exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

from torch import nn

from .casting import tensor_bytes
from .ledger import FixLedger
from .plan import PlanEntry, PrecisionPlan, plan_error
from .recovery import Fix, ModuleLookup, PlanValidator, RecoveryStrategy
from .report import FixInForce
from .state import StructureSnapshot, ValueSnapshot

PlanSource = PrecisionPlan | str | os.PathLike[str]
# What a strategy's ``validate`` or ``apply`` raises for parameters that do not fit the model.
PARAMETER_ERRORS = (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError)


@dataclasses.dataclass(frozen=True)
class PendingEntry:
    """A checked entry still to apply: its index in the plan (for errors) and its strategy."""

    index: int
    entry: PlanEntry
    strategy: RecoveryStrategy


def as_plan(plan: PlanSource) -> PrecisionPlan:
    """``plan`` itself, or the plan read from a file path."""
    if isinstance(plan, PrecisionPlan):
        return plan
    if isinstance(plan, str | os.PathLike):
        return PrecisionPlan.load(plan)
    raise TypeError(f"A precision plan is a PrecisionPlan or a file path, not {type(plan).__name__}.")


def misfit(plan: PrecisionPlan, index: int, entry: PlanEntry, field: str, problem: str) -> ValueError:
    """A ``ValueError`` naming the plan, the fix (index, strategy, module) and the field."""
    where = f"{entry.strategy} on {entry.module}"
    return plan_error(plan.source, problem, index=index, module=where, field=field, misfit=True)


def _error_text(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"


def _key(entry: PlanEntry) -> tuple[str, str, str, str | None]:
    """What makes two entries the same fix; parameters compared as canonical JSON (tuples are lists)."""
    try:
        params = json.dumps(entry.params, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        params = None
    return entry.strategy, entry.module, entry.module_class, params


def check_size(plan: PrecisionPlan, module_count: int) -> None:
    """At most one fix per module: refuse a larger plan before checking (or applying) any entry."""
    if isinstance(plan.entries, tuple | list) and len(plan.entries) > module_count:
        problem = f"{len(plan.entries)} fixes for a pipeline of {module_count} modules (one fix per module)"
        raise plan_error(plan.source, problem, misfit=True)


def pending_entries(
    plan: PrecisionPlan,
    strategies: Mapping[str, RecoveryStrategy],
    lookup: ModuleLookup,
    held: Sequence[PlanEntry],
    module_count: int,
) -> list[PendingEntry]:
    """The entries of ``plan`` still to apply, each checked against the pipeline; changes nothing."""
    check_size(plan, module_count)
    held_keys: dict[str, list[tuple[str, str, str, str | None]]] = {}
    for entry in held:
        held_keys.setdefault(entry.module, []).append(_key(entry))
    pending = []
    for index, entry in enumerate(plan.entries):
        try:
            module = lookup(entry.module)
        except KeyError as error:
            raise misfit(plan, index, entry, "module", _error_text(error)) from None
        if type(module).__name__ != entry.module_class:
            raise misfit(
                plan,
                index,
                entry,
                "module_class",
                f"{entry.module} is a {type(module).__name__} here but a {entry.module_class} in the plan "
                "(made for another model?)",
            )
        if entry.module in held_keys:
            if _key(entry) in held_keys[entry.module]:
                continue  # already held: applying it again would stack a second fix
            raise misfit(
                plan,
                index,
                entry,
                "module",
                "the guard already holds another fix there; call guard.reset() first",
            )
        strategy = strategies[entry.strategy]
        if isinstance(strategy, PlanValidator):
            try:
                strategy.validate(entry.module, entry.params, lookup)
            except PARAMETER_ERRORS as error:
                raise misfit(plan, index, entry, "params", _error_text(error)) from None
        pending.append(PendingEntry(index, entry, strategy))
    return pending


def touched_modules(entry: PlanEntry, lookup: ModuleLookup) -> list[nn.Module]:
    """The entry's module and every module its parameters name (a rescale's consumers, say)."""
    names, stack = [entry.module], [entry.params]
    while stack:  # depth is bounded by the plan's checks
        item = stack.pop()
        if isinstance(item, Mapping):
            names += [key for key in item if isinstance(key, str)]
            stack += list(item.values())
        elif isinstance(item, list | tuple):
            stack += list(item)
        elif isinstance(item, str):
            names.append(item)
    modules = []
    for name in dict.fromkeys(names):
        with contextlib.suppress(KeyError):
            modules.append(lookup(name))
    return modules


class Rollback:
    """Hooks and dtypes of every component, and host copies of the touched tensors, before a plan."""

    def __init__(self, components: list[nn.Module], touched: list[nn.Module]) -> None:
        self.structures = [StructureSnapshot.take(component) for component in components]
        self.values = ValueSnapshot.take(touched)

    def restore(self, applied: list[Fix]) -> None:
        """Revert the fixes applied so far, newest first, then put back whatever they or a failed one left."""
        for fix in reversed(applied):
            with contextlib.suppress(Exception):  # the copies below restore what a broken revert leaves
                fix.revert()
        for structure in self.structures:
            structure.restore()
        self.values.restore()


def apply_entries(
    plan: PrecisionPlan,
    pending: list[PendingEntry],
    components: list[nn.Module],
    lookup: ModuleLookup,
    ledger: FixLedger,
) -> None:
    """Apply checked entries all or nothing, within what the memory budget has left."""
    rollback = Rollback(components, [m for item in pending for m in touched_modules(item.entry, lookup)])
    applied: list[tuple[Fix, FixInForce]] = []
    budget = ledger.budget_left()
    try:
        for item in pending:
            before = tensor_bytes(components)
            fix = _apply_entry(plan, item, lookup)
            added = tensor_bytes(components) - before
            applied.append((fix, FixInForce(item.entry.strategy, item.entry.module, added)))
            total = sum(cost.extra_bytes for _, cost in applied)
            if total > budget:
                problem = f"the plan's fixes add {total} bytes; {budget} are left (guard_max_extra_memory)"
                raise misfit(plan, item.index, item.entry, "strategy", problem)
    except BaseException:
        rollback.restore([fix for fix, _ in applied])
        raise
    for fix, cost in applied:
        ledger.adopt(fix, cost)


def _apply_entry(plan: PrecisionPlan, item: PendingEntry, lookup: ModuleLookup) -> Fix:
    """One checked entry's ``apply``; an error of its parameters becomes the plan's ``ValueError``."""
    entry = item.entry
    try:
        fix = item.strategy.apply(entry.module, entry.params, lookup)
    except PARAMETER_ERRORS as error:
        problem = f"apply raised {type(error).__name__}: {error}"
        raise misfit(plan, item.index, entry, "params", problem) from error
    if not isinstance(fix, Fix):
        raise misfit(plan, item.index, entry, "strategy", f"apply returned {type(fix).__name__}, not a Fix")
    return fix
