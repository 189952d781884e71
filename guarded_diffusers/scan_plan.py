"""A precision plan from a headroom scan: float32 islands that fix every at-risk module before the first step.

An upcast island runs its module in float32 and casts the module's output back to the working
dtype, so the island must be a module whose own output fits: for each at-risk module, the
smallest enclosing module the scan saw run whose headroom meets the margin (the criterion the
``upcast`` strategy applies at run time, with ``FIT_HEADROOM = 2`` for a 1-bit margin). When no
module below the component fits, the island is the outermost module that ran (the component,
or the VAE's encoder or decoder). Islands nested inside another island are dropped.
"""

from __future__ import annotations

from .plan import PlanEntry, PrecisionPlan
from .scan import HeadroomScan, ModuleHeadroom


def enclosing(name: str, recorded: dict[str, ModuleHeadroom]) -> list[ModuleHeadroom]:
    """``name`` and the modules around it that ran, innermost first."""
    parts = name.split(".")
    prefixes = (".".join(parts[:length]) for length in range(len(parts), 0, -1))
    return [recorded[prefix] for prefix in prefixes if prefix in recorded]


def island_for(module: ModuleHeadroom, recorded: dict[str, ModuleHeadroom]) -> ModuleHeadroom:
    """The smallest module that encloses ``module`` and fits the working dtype with the margin."""
    chain = enclosing(module.module, recorded)
    return next((candidate for candidate in chain if not candidate.at_risk), chain[-1])


def plan_from_scan(scan: HeadroomScan) -> PrecisionPlan:
    """One ``upcast`` entry per island, sorted by module name; empty when nothing is at risk."""
    recorded = scan.by_name()
    islands = {island.module: island for island in (island_for(module, recorded) for module in scan.at_risk)}
    outermost = [
        island
        for name, island in sorted(islands.items())
        if not any(name.startswith(other + ".") for other in islands)
    ]
    return PrecisionPlan(
        tuple(
            PlanEntry(
                "upcast",
                island.module,
                island.module_class,
                {"dtype": "float32", "output_absmax": None if island.at_risk else island.absmax},
            )
            for island in outermost
        )
    )
