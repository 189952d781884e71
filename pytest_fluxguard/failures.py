"""The ways a fuzzed example fails, kept free of heavy imports so collection can name them."""

from __future__ import annotations

from typing import Any


class ExampleFailed(AssertionError):
    """One example went wrong; carries the example and its output so the minimal one can be shown.

    hypothesis raises the exception of the shrunk example's final replay, so these attributes
    belong to the minimal failing example.
    """

    def __init__(self, problem: str, example: Any, images: Any = None, report: Any = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.example = example
        self.images = images
        self.report = report


_CLASSES: dict[tuple[str, str], type[ExampleFailed]] = {}


def failure_class(kind: str, where: str | None = None) -> type[ExampleFailed]:
    """An ExampleFailed subclass per kind of failure and offending module, made once per session.

    hypothesis tells failures apart by their exception type and where it was raised: one class per
    module makes an overflow in T5 and one in the VAE two failures, each shrunk and reported, where
    a single class would merge them into whichever hypothesis found first.
    """
    key = (kind, where or "")
    if key not in _CLASSES:
        name = f"ExampleFailed[{kind}{' at ' + where if where else ''}]"
        _CLASSES[key] = type(name, (ExampleFailed,), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[key]


class FluxGuardFailure(Exception):
    """An item failed; the message is the whole explanation (example, module, report, PNG paths)."""
