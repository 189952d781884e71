"""A bound on the pipeline calls hypothesis spends shrinking an item's failures.

hypothesis shrinks a failure with as many calls as it finds useful and gives up only after five
minutes of slow progress: on a full-size model that is many minutes per failure, and a prompt of
hundreds of drawn tokens gives the shrinker thousands of candidates. The budget grants ``calls``
pipeline calls per distinct failure found; past it, ``BudgetSpent`` ends the search at once and
the item reports, per failure, the shortest failing example seen (printed, as a person reads it).
"""

from __future__ import annotations

from .failures import ExampleFailed
from .inputs import FillInputs


class BudgetSpent(BaseException):
    """Ends hypothesis' run: it lets through what is not an ``Exception``, as it does KeyboardInterrupt.

    hypothesis saves the example at hand to its database as it stops; the next run replays it
    once, with the failures it saved before.
    """


class ShrinkBudget:
    """Counts calls after the first failure; remembers each failing example and the smallest per kind."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self._after_failure: int | None = None
        self._failures: dict[str, ExampleFailed] = {}
        self._smallest: dict[type[ExampleFailed], ExampleFailed] = {}

    def known(self, example: FillInputs) -> ExampleFailed | None:
        """The failure ``example`` gave before, so a replay fails the same way without running."""
        return self._failures.get(repr(example))

    def spend(self) -> None:
        """Count one pipeline call; raise BudgetSpent past ``calls`` per distinct failure."""
        if self._after_failure is None:
            return
        self._after_failure += 1
        if self._after_failure > self.calls * len(self._smallest):
            raise BudgetSpent

    def failed(self, example: FillInputs, failure: ExampleFailed) -> None:
        self._failures[repr(example)] = failure
        smallest = self._smallest.get(type(failure))
        if smallest is None or len(repr(example)) <= len(repr(smallest.example)):
            self._smallest[type(failure)] = failure
        if self._after_failure is None:
            self._after_failure = 0

    def smallest(self) -> list[ExampleFailed]:
        """The shortest failing example of each kind, in the order the kinds were found."""
        return list(self._smallest.values())
