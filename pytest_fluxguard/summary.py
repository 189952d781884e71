"""Per-item counts, carried on test reports so they reach the controller under pytest-xdist.

A worker process runs the item; only its report travels back. The counts ride in the report's
``user_properties`` as JSON, and the controller gathers them as reports arrive.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

PROPERTY = "fluxguard"
_HEADER = ("item", "examples", "failures", "recovered", "first offending module")


@dataclasses.dataclass
class ItemStats:
    """What one item saw; shrinking replays count as examples too."""

    examples: int = 0
    failures: int = 0
    recovered: int = 0
    first_module: str | None = None

    def note_module(self, module: str | None) -> None:
        """Remember the first module that went non-finite; later ones are usually its fallout."""
        if self.first_module is None:
            self.first_module = module

    def to_property(self) -> tuple[str, str]:
        return PROPERTY, json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_properties(cls, properties: Iterable[tuple[str, object]]) -> ItemStats | None:
        for name, value in properties:
            if name == PROPERTY and isinstance(value, str):
                return cls(**json.loads(value))
        return None


def table(rows: dict[str, ItemStats]) -> list[str]:
    """The summary as aligned text lines, one per item."""
    cells = [_HEADER] + [
        (item, str(s.examples), str(s.failures), str(s.recovered), s.first_module or "-")
        for item, s in rows.items()
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(_HEADER))]
    lines = []
    for row in cells:
        first, *numbers, module = row
        numeric = [value.rjust(width) for value, width in zip(numbers, widths[1:-1], strict=True)]
        lines.append("  ".join([first.ljust(widths[0]), *numeric, module]))
    return lines
