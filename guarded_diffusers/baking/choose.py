"""The exponent ``k`` of each cut, from its measured float32 magnitudes.

Only as much as needed: ``k`` is the smallest with ``peak * 2**-k <= 2**13`` (three bits of
float16 headroom for inputs calibration did not see), 0 where the peak already fits. A larger
``k`` buys nothing and makes the normalisations' eps count where the tensor is small (measured on
tiny Flux: 113 dB at k=2, 90 at k=4, 66 at k=6), so the eps and float16-subnormal margins of the
smallest per-token statistic are reported with each choice for the self-check to weigh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

from .cuts import Cut

HEADROOM_PEAK = 2.0**13
# eps relative to the smallest scaled variance below which it changes nothing a float16 run can see.
EPS_NEGLIGIBLE = 2.0**-20
FLOAT16_SMALLEST_NORMAL = 2.0**-14


@dataclasses.dataclass(frozen=True)
class Choice:
    """A cut and its exponent; ``breaks`` says why a cut that needs scaling cannot be scaled."""

    cut: Cut
    k: int
    needed: int
    breaks: str | None = None

    @property
    def eps_ratio(self) -> float:
        """Largest eps / scaled smallest statistic over the cut's readers (0 when none measured)."""
        ratios = [
            self.cut.eps.get(name, 0.0) / (value * 4.0**-self.k) if value > 0 else math.inf
            for name, value in self.cut.smallest.items()
        ]
        return max(ratios, default=0.0)

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.k and self.eps_ratio > EPS_NEGLIGIBLE:
            notes.append(f"eps is {self.eps_ratio:.2g} of the smallest scaled variance")
        if self.k and self.cut.smallest_rms * 2.0**-self.k < FLOAT16_SMALLEST_NORMAL:
            notes.append("smallest scaled per-token RMS is a float16 subnormal")
        return notes

    def to_dict(self) -> dict[str, Any]:
        cut = self.cut
        return {
            "cut": cut.name,
            "k": self.k,
            "peak": cut.peak if math.isfinite(cut.peak) else "inf",
            "smallest_rms": cut.smallest_rms if math.isfinite(cut.smallest_rms) else None,
            "readers": cut.readers,
            "writers": cut.writers,
            "passers": cut.passers,
            "params": cut.params,
            "notes": self.notes,
            **({"breaks": self.breaks} if self.breaks else {}),
        }


def needed_exponent(peak: float, headroom_peak: float = HEADROOM_PEAK) -> int:
    """Smallest ``k >= 0`` with ``peak * 2**-k <= headroom_peak``."""
    if not math.isfinite(peak):
        return 0
    return max(0, math.ceil(math.log2(peak / headroom_peak))) if peak > headroom_peak else 0


def choose(cuts: list[Cut], headroom_peak: float = HEADROOM_PEAK) -> list[Choice]:
    """A choice per cut read by a normalisation; a pinned one that needs scaling is kept at 0 with why."""
    choices = []
    for cut in cuts:
        if not cut.readers:
            continue
        needed = needed_exponent(cut.peak, headroom_peak)
        if needed and cut.pinned is not None:
            choices.append(Choice(cut, 0, needed, f"read outside the normalisations: {cut.pinned}"))
        else:
            choices.append(Choice(cut, needed, needed))
    return choices


def within(choices: list[Choice], components: Collection[str]) -> list[Choice]:
    """``choices`` with every cut written outside ``components`` kept at 0, with why: a bake that
    writes only some components (a single-file transformer) cannot scale the others' tensors."""
    kept = []
    for choice in choices:
        outside = sorted(
            {name.partition(".")[0] for name in choice.cut.writers + choice.cut.params} - set(components)
        )
        if choice.k and outside:
            choice = dataclasses.replace(
                choice, k=0, breaks=f"in {', '.join(outside)}, which this bake does not write"
            )
        kept.append(choice)
    return kept
