"""Per-item counts, carried on test reports so they reach the controller under pytest-xdist.

A worker process runs the item; only its report travels back. The counts ride in the report's
``user_properties`` as JSON, and the controller gathers them as reports arrive.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

PROPERTY = "fluxguard"
_HEADER = ("item", "examples", "failures", "recovered", "peak", "first offending module")


@dataclasses.dataclass
class ItemStats:
    """What one item saw; shrinking replays count as examples too.

    ``peak`` is the largest value any layer of ``peak_component`` produced, over the dtype's maximum,
    in an example that passed: how close the model came to overflowing. ``guidance_limit`` is the
    guidance the item's draws stopped at because the pipeline cannot carry more in its dtype.
    """

    examples: int = 0
    failures: int = 0
    recovered: int = 0
    first_module: str | None = None
    peak: float = 0.0
    peak_component: str | None = None
    guidance_limit: float | None = None

    def note_module(self, module: str | None) -> None:
        """Remember the first module that went non-finite; later ones are usually its fallout."""
        if self.first_module is None:
            self.first_module = module

    def note_peaks(self, peaks: Mapping[str, float]) -> None:
        """Keep the highest component peak seen so far."""
        for component, ratio in peaks.items():
            if ratio > self.peak:
                self.peak, self.peak_component = ratio, component

    def to_property(self) -> tuple[str, str]:
        return PROPERTY, json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_properties(cls, properties: Iterable[tuple[str, object]]) -> ItemStats | None:
        for name, value in properties:
            if name == PROPERTY and isinstance(value, str):
                return cls(**json.loads(value))
        return None


def _peak(stats: ItemStats) -> str:
    if stats.peak_component is None:
        return "-"
    shown = f"{stats.peak:.2g}" if stats.peak < 1.0 else ">=1"  # >= 1: overflowed, and recovered
    return f"{shown} {stats.peak_component}"


def table(rows: dict[str, ItemStats]) -> list[str]:
    """The summary as aligned text lines, one per item."""
    cells = [_HEADER] + [
        (item, str(s.examples), str(s.failures), str(s.recovered), _peak(s), s.first_module or "-")
        for item, s in rows.items()
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(_HEADER))]
    lines = []
    for row in cells:
        first, *numbers, peak, module = row
        numeric = [value.rjust(width) for value, width in zip(numbers, widths[1:-2], strict=True)]
        lines.append("  ".join([first.ljust(widths[0]), *numeric, peak.ljust(widths[-2]), module]))
    return lines


def limitations(rows: dict[str, ItemStats]) -> list[str]:
    """The pipeline's own limits the items kept within, once per session, not counted as failures."""
    limits = sorted({s.guidance_limit for s in rows.values() if s.guidance_limit is not None})
    if not limits:
        return []
    drawn = " and ".join(f"{limit:.4g}" for limit in limits)
    return [
        f"known pipeline limitation (not the model's): raw items drew guidance_scale up to {drawn}, not 100.",
        "  FluxTransformer2DModel.forward computes guidance x 1000 in the working dtype, and float16 holds",
        "  at most 65504: plain diffusers overflows above 65.504 with any Flux weights. Guarded items draw",
        "  up to 100 (the guard's `guidance` fix computes it in float32); --fluxguard-max-guidance sets",
        "  the range of every item.",
    ]
