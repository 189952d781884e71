"""The two ways a fuzzed example fails, kept free of heavy imports so collection can name them."""

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


class FluxGuardFailure(Exception):
    """An item failed; the message is the whole explanation (example, module, report, PNG paths)."""
