"""The one interface every recovery strategy implements, built-in or a user's.

A strategy receives the ``Location`` of an overflow and either applies a ``Fix`` to the
model, in place and reversibly, or returns ``None`` (or raises ``Declined("why")``) when it
cannot help. The guard then
recomputes the failed stage and checks it again; the strategy never touches the pipeline.
``apply`` re-creates a fix from the parameters its ``describe()`` gave, for precision plans.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .locate import Location

# Resolves a qualified module name ("transformer.single_transformer_blocks.0") to the module;
# raises ``KeyError`` for a name the pipeline does not have.
ModuleLookup = Callable[[str], nn.Module]


class Declined(Exception):
    """Raised by ``recover`` instead of returning ``None`` to say why: the report shows the reason."""


@runtime_checkable
class Fix(Protocol):
    """A change a strategy made to the model; it stays until ``revert()``."""

    strategy: str
    module_name: str

    def revert(self) -> None:
        """Undo the change exactly: weights bit for bit, dtypes, hooks."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable parameters of the change, enough for ``apply`` to re-create it.

        A fix that changes modules other than ``module_name`` names them all in an optional
        ``changed_modules`` attribute, so the guard measures a region that encloses every change.
        """


@runtime_checkable
class RecoveryStrategy(Protocol):
    """Turns a located overflow into a ``Fix``, or declines with ``None``."""

    name: str

    def recover(self, location: Location) -> Fix | None:
        """Apply a fix for ``location`` to the model, or return ``None`` to let the next strategy try."""

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> Fix:
        """Re-create a fix from a plan entry; ``ValueError`` if ``params`` do not fit the model."""


@runtime_checkable
class PlanValidator(Protocol):
    """Optional for a strategy: check a plan entry before the guard changes any tensor.

    A strategy without ``validate`` still works; its ``apply`` is then the only check, and the
    guard rolls back whatever a failing ``apply`` changed.
    """

    def validate(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> None:
        """``ValueError`` naming the parameter (in backticks) if ``params`` do not fit; changes nothing."""
