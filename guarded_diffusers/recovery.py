"""The one interface every recovery strategy implements, built-in or a user's.

A strategy receives the ``Location`` of an overflow and either applies a ``Fix`` to the
model, in place and reversibly, or returns ``None`` when it cannot help. The guard then
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


@runtime_checkable
class Fix(Protocol):
    """A change a strategy made to the model; it stays until ``revert()``."""

    strategy: str
    module_name: str

    def revert(self) -> None:
        """Undo the change exactly: weights bit for bit, dtypes, hooks."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable parameters of the change, enough for ``apply`` to re-create it."""


@runtime_checkable
class RecoveryStrategy(Protocol):
    """Turns a located overflow into a ``Fix``, or declines with ``None``."""

    name: str

    def recover(self, location: Location) -> Fix | None:
        """Apply a fix for ``location`` to the model, or return ``None`` to let the next strategy try."""

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> Fix:
        """Re-create a fix from a plan entry; ``ValueError`` if ``params`` do not fit the model."""
