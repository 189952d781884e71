"""The fixes a guard holds: in the order they were made, with what each costs and how it measured.

Everything that adds or removes a fix goes through the ledger, so the memory budget, the report's
"fixes in force" and a call's rollback all read one list.
"""

from __future__ import annotations

from .recovery import Fix
from .report import FixInForce


class FixLedger:
    """Held fixes (oldest first), their cost, and the ones made during the current call."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.fixes: list[Fix] = []
        self._this_call: list[Fix] = []
        self._costs: dict[int, FixInForce] = {}

    def remember(self, fix: Fix) -> None:
        self.fixes.append(fix)
        self._this_call.append(fix)

    def record(self, fix: Fix, cost: FixInForce) -> None:
        """What ``fix`` (held) adds to memory and how faithful it measured."""
        self._costs[id(fix)] = cost

    def revert(self, fixes: list[Fix]) -> None:
        """Revert ``fixes`` newest first (a fix may enclose an older one) and forget them."""
        undone = {id(fix) for fix in fixes}
        for fix in reversed(list(fixes)):
            fix.revert()
            self._costs.pop(id(fix), None)
        self.fixes = [fix for fix in self.fixes if id(fix) not in undone]
        self._this_call = [fix for fix in self._this_call if id(fix) not in undone]

    def begin_call(self) -> None:
        self._this_call = []

    def revert_call(self) -> None:
        """Undo what the current call fixed; fixes from earlier calls stay."""
        self.revert(self._this_call)

    def in_force(self) -> list[FixInForce]:
        """The fixes held now, oldest first, with the memory each adds and how faithful it measured."""
        return [
            self._costs.get(id(fix)) or FixInForce(fix.strategy, fix.module_name, 0) for fix in self.fixes
        ]

    def budget_left(self) -> int:
        """Bytes a new fix may still add: the budget less what the held fixes add."""
        return self.budget_bytes - sum(cost.extra_bytes for cost in self.in_force())
