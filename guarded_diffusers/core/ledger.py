"""The fixes a guard holds: in the order they were made, with what each costs and how it measured.

Everything that adds or removes a fix goes through the ledger, so the memory budget, the report's
"fixes in force" and a call's rollback all read one list. A lock keeps the list whole when the
same guarded pipeline serves calls from several threads; each call remembers its own fixes.
Fixes are undone only while no other thread's forward runs (``gate``).
"""

from __future__ import annotations

import threading

from .context import current_call
from .gate import exclusive
from .recovery import Fix
from .report import FixInForce


class FixLedger:
    """Held fixes (oldest first), their cost, and the ones made during the current call."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.fixes: list[Fix] = []
        self._costs: dict[int, FixInForce] = {}
        self._lock = threading.RLock()

    def remember(self, fix: Fix) -> None:
        """Hold ``fix``; the guarded call this thread is in (if any) may roll it back."""
        with self._lock:
            self.fixes.append(fix)
        call = current_call()
        if call is not None:
            call.fixes_made.append(fix)

    def adopt(self, fix: Fix, cost: FixInForce) -> None:
        """Hold a fix made outside any call (from a plan), with what it costs."""
        with self._lock:
            self.fixes.append(fix)
            self._costs[id(fix)] = cost

    def record(self, fix: Fix, cost: FixInForce) -> None:
        """What ``fix`` (held) adds to memory and how faithful it measured."""
        self._costs[id(fix)] = cost

    def revert(self, fixes: list[Fix]) -> None:
        """Revert ``fixes`` newest first (a fix may enclose an older one) and forget them."""
        # The gate first, as a recovery holds it while it takes the lock: no other thread's forward
        # sees a fix half undone.
        with exclusive(), self._lock:
            held = {id(fix) for fix in self.fixes}
            undone = [fix for fix in fixes if id(fix) in held]
            for fix in reversed(undone):
                fix.revert()
                self._costs.pop(id(fix), None)
            gone = {id(fix) for fix in undone}
            self.fixes = [fix for fix in self.fixes if id(fix) not in gone]

    def restore_costs(self, costs: list[FixInForce]) -> None:
        """After fixes were lifted and re-applied, give each back the cost and measured error it had
        (a plan carries neither), matched by strategy and module."""
        lifted = {(cost.strategy, cost.module): cost for cost in costs}
        for fix in self.fixes:
            cost = lifted.pop((fix.strategy, fix.module_name), None)
            if cost is not None:
                self._costs[id(fix)] = cost

    def in_force(self) -> list[FixInForce]:
        """The fixes held now, oldest first, with the memory each adds and how faithful it measured."""
        return [
            self._costs.get(id(fix)) or FixInForce(fix.strategy, fix.module_name, 0) for fix in self.fixes
        ]

    def budget_left(self) -> int:
        """Bytes a new fix may still add: the budget less what the held fixes add."""
        return self.budget_bytes - sum(cost.extra_bytes for cost in self.in_force())
