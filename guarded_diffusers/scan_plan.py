"""A precision plan from a headroom scan: float32 islands that fix every at-risk module before the first step.

An upcast island runs its module in float32 and casts the module's output back to the working
dtype, so the island must be a module whose own output fits: for each at-risk module, the
smallest enclosing module the scan saw run whose headroom meets the margin (the criterion the
``upcast`` strategy applies at run time, with ``FIT_HEADROOM = 2`` for a 1-bit margin). When no
module below the component fits, the island is the outermost module that ran (the component,
or the VAE's encoder or decoder). Islands nested inside another island are dropped. Flux's
guidance x 1000 overflow, seen in the guidance embedder's input, is planned as the ``guidance``
fix instead of an island over the whole transformer.
"""

from __future__ import annotations

from .measure import encloses
from .plan import PlanEntry, PrecisionPlan
from .scan import HeadroomScan, ModuleHeadroom
from .strategies.guidance import EMBEDDING_SCALE

GUIDANCE_EMBEDDER = "CombinedTimestepGuidanceTextProjEmbeddings"


def enclosing(name: str, recorded: dict[str, ModuleHeadroom]) -> list[ModuleHeadroom]:
    """``name`` and the modules around it that ran, innermost first."""
    parts = name.split(".")
    prefixes = (".".join(parts[:length]) for length in range(len(parts), 0, -1))
    return [recorded[prefix] for prefix in prefixes if prefix in recorded]


def island_for(module: ModuleHeadroom, recorded: dict[str, ModuleHeadroom]) -> ModuleHeadroom:
    """The smallest module that encloses ``module`` and fits the working dtype with the margin."""
    chain = enclosing(module.module, recorded)
    return next((candidate for candidate in chain if not candidate.at_risk), chain[-1])


def _guidance_input(module: ModuleHeadroom) -> bool:
    """Flux's guidance embedder whose input, not output, is out of range: guidance x 1000 overflowed
    in the transformer's own forward, which the ``guidance`` strategy fixes at no memory cost."""
    return module.module_class == GUIDANCE_EMBEDDER and module.input_headroom_bits < module.headroom_bits


def plan_from_scan(scan: HeadroomScan) -> PrecisionPlan:
    """One ``upcast`` entry per island (or a ``guidance`` entry), sorted by module name; empty when
    nothing is at risk."""
    recorded = scan.by_name()
    guidance = [module for module in scan.at_risk if _guidance_input(module)]
    # Inside the embedder the same input overflows (its time projection): the guidance fix covers it.
    covered = {
        module.module
        for module in scan.at_risk
        for embedder in guidance
        if encloses(embedder.module, module.module) and module.headroom_bits >= scan.margin_bits
    }
    at_risk = [module for module in scan.at_risk if module.module not in covered]
    islands = {island.module: island for island in (island_for(module, recorded) for module in at_risk)}
    outermost = [
        island
        for name, island in sorted(islands.items())
        if not any(name.startswith(other + ".") for other in islands)
    ]
    entries = [
        PlanEntry(
            "upcast",
            island.module,
            island.module_class,
            {"dtype": "float32", "output_absmax": None if island.at_risk else island.absmax},
        )
        for island in outermost
    ]
    entries += [
        PlanEntry("guidance", module.module, module.module_class, {"scale": EMBEDDING_SCALE})
        for module in guidance
        if not any(module.module.startswith(island.module + ".") for island in outermost)
    ]
    return PrecisionPlan(tuple(sorted(entries, key=lambda entry: entry.module)))
