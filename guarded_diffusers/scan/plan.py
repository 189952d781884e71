"""A precision plan from a headroom scan: fixes for every at-risk module, within the memory budget.

1. **Upcast islands**, the most faithful fix, where they fit. An island runs its module in
   float32 and casts the module's output back to the working dtype, so the island must be a
   module whose own output fits: for each at-risk module, the smallest enclosing module the scan
   saw run whose headroom meets the margin (the criterion the ``upcast`` strategy applies at run
   time, with ``FIT_HEADROOM = 2`` for a 1-bit margin). Islands nested inside another island are
   dropped, and the rest are kept in name order while their float32 cost (the parameter bytes
   float32 would add) stays within the budget (``HeadroomScan.budget_bytes``, the guard's
   ``guard_max_extra_memory``).
2. **Residual**, where no module below the whole component fits (the residual stream itself is
   out of range) or the island would pass the budget: the at-risk Linear or convolution whose own
   output is out of range computes in float32 (``{"exponent": k}``, ``k = max(1, ceil(log2(absmax
   * 4 / dtype max)))`` from its float32 absmax), and the residual stream travels in float32 from
   there; it adds no parameter memory. Other at-risk modules of that stream (the blocks of a
   stream span, the normalisation that reads it) are carried by it. Residual cannot help where a
   Linear or convolution reads the out-of-range values itself (its input is at risk): its input is
   cast back to the working dtype. Then the whole component is the island, if the budget holds it.
3. What neither fixes within the budget is left out of the plan, with the reason; the guard can
   still recover it at run time (``rescale``, for instance, needs no memory).

Flux's guidance x 1000 overflow, seen in the guidance embedder's input, is planned as the
``guidance`` fix instead of an island over the whole transformer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

from ..core.measure import encloses
from ..core.plan import PlanEntry, PrecisionPlan
from ..strategies.guidance import EMBEDDING_SCALE
from ..strategies.upcast import FIT_HEADROOM
from .headroom import HeadroomScan, ModuleHeadroom

GUIDANCE_EMBEDDER = "CombinedTimestepGuidanceTextProjEmbeddings"
# The residual strategy scales the layer's input so its result fits with this much room.
RESIDUAL_HEADROOM = 2.0 * FIT_HEADROOM


def enclosing(name: str, recorded: dict[str, ModuleHeadroom]) -> list[ModuleHeadroom]:
    """``name`` and the modules around it that ran, innermost first."""
    parts = name.split(".")
    prefixes = (".".join(parts[:length]) for length in range(len(parts), 0, -1))
    return [recorded[prefix] for prefix in prefixes if prefix in recorded]


def island_for(module: ModuleHeadroom, recorded: dict[str, ModuleHeadroom]) -> ModuleHeadroom:
    """The smallest module that encloses ``module`` and fits the working dtype with the margin."""
    chain = enclosing(module.module, recorded)
    return next((candidate for candidate in chain if not candidate.at_risk), chain[-1])


def residual_exponent(absmax: float, dtype_max: float) -> int:
    """The power of two that brings a float32 ``absmax`` under ``dtype_max`` with the strategy's room."""
    return max(1, math.ceil(math.log2(absmax * RESIDUAL_HEADROOM / dtype_max)))


def _guidance_input(module: ModuleHeadroom) -> bool:
    """Flux's guidance embedder whose input, not output, is out of range: guidance x 1000 overflowed
    in the transformer's own forward, which the ``guidance`` strategy fixes at no memory cost."""
    return module.module_class == GUIDANCE_EMBEDDER and module.input_headroom_bits < module.headroom_bits


def _natural(name: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _cost(module: ModuleHeadroom) -> int:
    return module.float32_extra_bytes or 0


@dataclasses.dataclass(frozen=True)
class PlannedFix:
    """One plan entry, the at-risk modules it fixes, what it adds to parameter memory, and why."""

    entry: PlanEntry
    covers: tuple[str, ...]
    extra_bytes: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.entry.strategy,
            "module": self.entry.module,
            "params": dict(self.entry.params),
            "covers": list(self.covers),
            "extra_bytes": self.extra_bytes,
            "reason": self.reason,
        }


@dataclasses.dataclass(frozen=True)
class Unplanned:
    """An at-risk module no plan entry fixes within the budget, and why."""

    module: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """The plan with its reasons: what each entry covers and costs, and what is left unplanned."""

    fixes: tuple[PlannedFix, ...]
    unplanned: tuple[Unplanned, ...]
    budget_bytes: int | None

    @property
    def plan(self) -> PrecisionPlan:
        return PrecisionPlan(tuple(fix.entry for fix in self.fixes))

    @property
    def extra_bytes(self) -> int:
        return sum(fix.extra_bytes for fix in self.fixes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "extra_bytes": self.extra_bytes,
            "fixes": [fix.to_dict() for fix in self.fixes],
            "unplanned": [item.to_dict() for item in self.unplanned],
        }


class _Planner:
    """The three passes of the module docstring, over one scan."""

    def __init__(self, scan: HeadroomScan) -> None:
        self.scan = scan
        self.recorded = scan.by_name()
        self.budget = scan.budget_bytes
        self.islands: dict[str, tuple[ModuleHeadroom, list[str], str]] = {}  # name -> (island, covers, why)
        self.fixes: list[PlannedFix] = []
        self.unplanned: list[Unplanned] = []

    # -- helpers -------------------------------------------------------------------------------

    def outermost(self, name: str) -> ModuleHeadroom:
        return enclosing(name, self.recorded)[-1]

    def spent(self) -> int:
        return sum(_cost(island) for island, _, _ in self.islands.values())

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.spent()

    def held_by_island(self, name: str) -> str | None:
        return next((island for island in self.islands if encloses(island, name)), None)

    def _budget_text(self) -> str:
        fraction = self.scan.max_extra_memory
        return f"--max-extra-memory {fraction:g}" if fraction is not None else "the budget"

    def _too_big(self, island: ModuleHeadroom, cost: int) -> str:
        """Why an island is not planned, and the budget that would hold it."""
        text = (
            f"a float32 island on {island.module} would add {cost} bytes; {self._budget_text()} leaves "
            f"{max(0, int(self.left()))} of {self.budget}"
        )
        if self.scan.parameter_bytes:
            needed = math.ceil(1000 * (self.spent() + cost) / self.scan.parameter_bytes) / 1000
            if needed <= 1:
                text += f" (--max-extra-memory {needed:g} would hold it)"
        return text

    # -- passes --------------------------------------------------------------------------------

    def plan(self) -> ScanPlan:
        at_risk = list(self.scan.at_risk)
        guidance = [module for module in at_risk if _guidance_input(module)]
        # Inside the embedder the same input overflows (its time projection): the guidance fix covers it.
        covered_by_guidance = {
            module.module: embedder.module
            for module in at_risk
            for embedder in guidance
            if encloses(embedder.module, module.module) and module.headroom_bits >= self.scan.margin_bits
        }
        at_risk = [module for module in at_risk if module.module not in covered_by_guidance]
        alternatives = self._islands(at_risk)
        self._residual(alternatives)
        for embedder in guidance:
            if self.held_by_island(embedder.module) is None:
                covers = [embedder.module]
                covers += [name for name, by in covered_by_guidance.items() if by == embedder.module]
                entry = PlanEntry(
                    "guidance", embedder.module, embedder.module_class, {"scale": EMBEDDING_SCALE}
                )
                reason = (
                    f"the transformer multiplies the guidance by 1000 in the working dtype before "
                    f"{embedder.module} sees it (input absmax {embedder.input_absmax:.4g}); fixed in "
                    "place at no memory cost"
                )
                self.fixes.append(PlannedFix(entry, tuple(sorted(covers, key=_natural)), 0, reason))
        for name, (island, covers, why) in self.islands.items():
            params = {"dtype": "float32", "output_absmax": None if island.at_risk else island.absmax}
            entry = PlanEntry("upcast", name, island.module_class, params)
            self.fixes.append(PlannedFix(entry, tuple(sorted(covers, key=_natural)), _cost(island), why))
        fixes = sorted(self.fixes, key=lambda fix: fix.entry.module)
        unplanned = sorted(self.unplanned, key=lambda item: _natural(item.module))
        return ScanPlan(tuple(fixes), tuple(unplanned), self.budget)

    def _islands(self, at_risk: list[ModuleHeadroom]) -> list[tuple[ModuleHeadroom, str]]:
        """Keep the fitting islands the budget holds; return the modules that need another fix, and why."""
        alternatives: list[tuple[ModuleHeadroom, str]] = []
        fitting: dict[str, list[ModuleHeadroom]] = collections.defaultdict(list)
        for module in at_risk:
            chain = enclosing(module.module, self.recorded)
            island = next((candidate for candidate in chain if not candidate.at_risk), None)
            if island is None or island is chain[-1]:
                alternatives.append((module, f"no module below {chain[-1].module} fits {self.scan.dtype}"))
            else:
                fitting[island.module].append(module)
        names = sorted(fitting, key=_natural)
        outer = [
            name for name in names if not any(encloses(other, name) and other != name for other in names)
        ]
        for name in outer:
            island = self.recorded[name]
            covered = [module for inner in names if encloses(name, inner) for module in fitting[inner]]
            if _cost(island) <= self.left():
                why = (
                    f"the smallest enclosing module whose output ({island.absmax:.4g}) and inputs "
                    f"({island.input_absmax:.4g}) fit {self.scan.dtype} with the margin"
                )
                self.islands[name] = (island, [module.module for module in covered], why)
            else:
                too_big = self._too_big(island, _cost(island))
                alternatives += [(module, too_big) for module in covered]
        return alternatives

    def _residual(self, alternatives: list[tuple[ModuleHeadroom, str]]) -> None:
        """Residual on the layers that produce the out-of-range values; the stream carries the rest."""
        margin = self.scan.margin_bits
        by_owner: dict[str, list[tuple[ModuleHeadroom, str]]] = collections.defaultdict(list)
        for module, why in alternatives:
            by_owner[self.outermost(module.module).module].append((module, why))
        for owner, items in sorted(by_owner.items()):
            producers = [(m, why) for m, why in items if m.layer and m.input_headroom_bits >= margin]
            readers = [m for m, _ in items if m.layer and m.input_headroom_bits < margin]
            carried = [m for m, _ in items if not m.layer]
            if producers and not readers:
                self._plan_residual(producers, carried)
                continue
            if readers:
                names = ", ".join(m.module for m in readers)
                blocked = (
                    f"residual cannot help: {names} reads the out-of-range values itself "
                    f"(input absmax {max(m.input_absmax for m in readers):.4g}) and would cast them back "
                    f"to {self.scan.dtype}"
                )
            else:
                blocked = "no at-risk Linear or convolution produces the out-of-range values"
            self._whole(owner, [m for m, _ in items], items[0][1], blocked)

    def _stream_position(self, name: str) -> int | None:
        """The index of the residual-stream block holding ``name``, in stream order."""
        return next(
            (index for index, block in enumerate(self.scan.stream) if encloses(block.block, name)), None
        )

    def _order(self, module: ModuleHeadroom) -> tuple[float, list[Any]]:
        position = self._stream_position(module.module)
        return (math.inf if position is None else position, _natural(module.module))

    def _plan_residual(
        self, producers: list[tuple[ModuleHeadroom, str]], carried: list[ModuleHeadroom]
    ) -> None:
        dtype = self.scan.dtype
        largest = math.floor(math.log2(self.scan.dtype_max))
        planned: list[tuple[ModuleHeadroom, int, str]] = []
        for module, why in sorted(producers, key=lambda item: self._order(item[0])):
            if not math.isfinite(module.absmax):
                self.unplanned.append(
                    Unplanned(module.module, "non-finite in float32 too: not a range overflow")
                )
                continue
            exponent = residual_exponent(module.absmax, self.scan.dtype_max)
            if exponent > largest:
                reason = f"its float32 absmax {module.absmax:.4g} needs 2**{exponent}, past {dtype}'s range"
                self.unplanned.append(Unplanned(module.module, reason))
                continue
            planned.append((module, exponent, why))
        if not planned:
            for module in carried:
                self.unplanned.append(
                    Unplanned(module.module, "the layer producing its values could not be planned")
                )
            return
        # Each carried module (a block of a stream span, the normalisation reading the stream) goes to the
        # producer inside it, else to the last producer before it in the stream, else to the last one.
        covers: dict[str, list[str]] = {module.module: [module.module] for module, _, _ in planned}
        for module in sorted(carried, key=self._order):
            inside = [p for p, _, _ in planned if encloses(module.module, p.module)]
            before = [p for p, _, _ in planned if self._order(p) <= self._order(module)]
            by = (inside or before or [planned[-1][0]])[0 if inside else -1]
            covers[by.module].append(module.module)
        for module, exponent, why in planned:
            carries = [name for name in covers[module.module] if name != module.module]
            reason = (
                f"its output reaches {module.absmax:.4g} in float32, past {dtype}'s range, and {why}: it "
                f"computes in float32 (input scaled by 2**-{exponent}) and the residual stream travels in "
                "float32 from here; no parameter memory"
            )
            if carries:
                reason += f"; the float32 stream carries {', '.join(carries)}"
            entry = PlanEntry("residual", module.module, module.module_class, {"exponent": exponent})
            self.fixes.append(PlannedFix(entry, tuple(covers[module.module]), 0, reason))

    def _whole(self, owner: str, modules: list[ModuleHeadroom], why: str, blocked: str) -> None:
        """The component-wide island, if the budget holds it; else the modules stay unplanned."""
        island = self.recorded[owner]
        inner = [name for name in self.islands if encloses(owner, name) and name != owner]
        cost = _cost(island) - sum(_cost(self.islands[name][0]) for name in inner)
        if cost <= self.left():
            covers = [module.module for module in modules]
            for name in inner:
                covers += self.islands.pop(name)[1]
            reason = f"{why}; {blocked}: the whole {owner} in float32"
            self.islands[owner] = (island, covers, reason)
            return
        too_big = self._too_big(island, _cost(island))
        for module in modules:
            self.unplanned.append(Unplanned(module.module, f"{why}; {blocked}; {too_big}"))


def plan_scan(scan: HeadroomScan) -> ScanPlan:
    """The plan for ``scan`` with the reason for each entry; entries sorted by module name."""
    return _Planner(scan).plan()


def plan_from_scan(scan: HeadroomScan) -> PrecisionPlan:
    """Islands within the budget, else ``residual`` on the producing layers (or ``guidance``); empty when
    nothing is at risk."""
    return plan_scan(scan).plan
