"""``bake(pipe)``: calibrate, find cuts, choose k, apply, self-check; the weights change only if it passes.

The steps, each in its own module: ``calibrate`` (float32 run, every stage traced), ``cuts``
(scale classes merged over calls), ``choose`` (k per cut), ``apply`` (powers of two per tensor),
``verify`` (float32 and float16 fidelity), ``remaining`` (what still overflows). ``write`` puts a
passing bake into a folder plain diffusers loads. Every run reads its weights through ``Weights``:
the pipeline's own tensors (``InMemory``), or block by block from a folder's files
(``streamed.load_streamed``), which is the same bake for a model that does not fit in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import torch

from ..core.plan import PrecisionPlan
from .apply import Scaling, scaling_for
from .calibrate import Call, calibrate, run_images
from .choose import HEADROOM_PEAK, Choice, choose, within
from .placement import VALUES, WRITERS, upstream_choices
from .remaining import Remaining, plan_for, recording, remaining
from .verify import FLOAT16_TOLERANCE_DB, Checks, cast_copy, run_psnr, worst_psnr

Exponents = dict[str, dict[str, int]]

FORMAT = "guarded-diffusers/bake"
VERSION = 1
Progress = Callable[[str], None]
# A failed self-check re-runs float32 with each scaled cut alone, for this many cuts at most.
PER_CUT_SHOWN = 8
PLACEMENTS = ("measured", WRITERS, VALUES)


class BakeError(Exception):
    """The self-check failed: nothing was changed or written; ``result`` holds the figures."""

    def __init__(self, message: str, result: BakeResult) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class BakeResult:
    """What a bake chose, changed and measured; ``to_dict()`` is the ``fluxguard-bake.json`` it writes."""

    choices: list[Choice]
    scaling: Scaling
    checks: Checks
    remaining: list[Remaining]
    plan: PrecisionPlan
    subnormals: dict[str, int]

    @property
    def scaled(self) -> list[Choice]:
        return [choice for choice in self.choices if choice.k]

    @property
    def breaks(self) -> list[Choice]:
        return [choice for choice in self.choices if choice.breaks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "headroom_peak": HEADROOM_PEAK,
            "cuts": [choice.to_dict() for choice in self.choices if choice.k or choice.breaks],
            "unscaled_cuts": sum(1 for choice in self.choices if not (choice.k or choice.breaks)),
            "exponents": self.scaling.exponents,
            "checks": self.checks.to_dict(),
            "subnormals": self.subnormals,
            "remaining": [item.to_dict() for item in self.remaining],
        }


class Weights(Protocol):
    """Where a bake's runs find the weights its pipeline does not hold in memory."""

    def running(self, pipe: Any, exponents: Exponents) -> contextlib.AbstractContextManager[None]:
        """Within: ``pipe`` (the one baked, or a half-precision copy of it) runs with the weights
        it does not hold scaled by ``exponents`` (by component, then tensor name)."""
        ...

    def subnormals(self, scaling: Scaling) -> dict[str, int]:
        """``Scaling.subnormals`` counted on the unscaled weights, wherever they are."""
        ...


class InMemory:
    """Every weight is the pipeline's own tensor, which ``Scaling.apply`` scales in place."""

    def running(self, pipe: Any, exponents: Exponents) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def subnormals(self, scaling: Scaling) -> dict[str, int]:
        return scaling.subnormals()


def bake(
    pipe: Any,
    calls: Sequence[Call],
    *,
    headroom_peak: float = HEADROOM_PEAK,
    check_float16: bool = True,
    progress: Progress | None = None,
    weights: Weights | None = None,
    components: Collection[str] | None = None,
    placement: str = "measured",
) -> BakeResult:
    """Make the float32 ``pipe``'s weights float16-safe in place, by exact powers of two; say what remains.

    ``calls`` are pipeline keyword arguments (``seed`` seeds each call's generator), for instance
    ``baking.samples.scan_calls(pipe)``, drawn like the scan's. Raises ``BakeError`` (``pipe``
    unchanged) when the baked float32 pipeline is under 80 dB from the original or, with nothing
    left overflowing, its float16 images are less faithful than the original's float16 or bfloat16.
    ``weights`` says where the runs read what ``pipe`` does not hold: ``streamed.load_streamed(src)``
    gives a pipeline whose residual blocks stay in the folder's files, and its weights.
    ``components`` names those whose weights may change (None: all); a cut elsewhere that needs
    scaling is left as it is, said in its choice's ``breaks``. ``placement`` says where a factor
    that can sit one layer earlier goes (``placement.py``): ``"measured"`` bakes both in float16
    and keeps the better, ``"writers"`` or ``"values"`` takes that one without measuring the other.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    say = progress or (lambda _: None)
    weights = weights or InMemory()
    narrow = [
        name
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        and any(p.is_floating_point() and p.dtype != torch.float32 for p in component.parameters())
    ]
    if narrow:
        raise ValueError(
            f"bake() calibrates in float32, but {', '.join(narrow)} is not: "
            "load the pipeline with dtype=torch.float32"
        )
    pipe.set_progress_bar_config(disable=True)
    calls = list(calls)
    with weights.running(pipe, {}):
        calibration = calibrate(pipe, calls, say)
    reference = calibration.images
    cuts, layers = calibration.finder.cuts()
    choices = choose(cuts, headroom_peak)
    if components is not None:
        choices = within(choices, components)
    scaled = [choice for choice in choices if choice.k]
    moved = upstream_choices(cuts, layers, scaled) if placement != WRITERS else []
    placements = _candidates(placement, scaled, moved, measurable=check_float16)
    halves = {}
    placed: dict[str, float] = {}
    if check_float16:
        for dtype in (torch.float16, torch.bfloat16):
            halves[dtype] = _cast_psnr(pipe, dtype, weights, {}, calls, reference)
            say(f"original {str(dtype).removeprefix('torch.')} checked")
        for name, chosen in placements.items():
            placed[name] = _baked_float16(pipe, scaling_for(pipe, chosen, layers), weights, calls, reference)
            say(f"baked float16 checked ({name})" if len(placements) > 1 else "baked float16 checked")
    placement = _better_placement(placed) if len(placed) > 1 else next(iter(placements))
    if placement == VALUES:
        choices = choices + moved
    scaling = scaling_for(pipe, placements[placement], layers)
    subnormals = weights.subnormals(scaling)
    checks = Checks(baked_float32=0.0, placement=placement)
    if len(placed) > 1:
        checks.placements_float16 = placed
    if check_float16:
        checks.original_float16 = halves[torch.float16]
        checks.original_bfloat16 = halves[torch.bfloat16]
        checks.baked_float16 = placed[placement]
    scans: list = []
    scaling.apply()
    try:
        with weights.running(pipe, scaling.exponents), recording(pipe, scans):
            checks.baked_float32 = worst_psnr(run_images(pipe, calls), reference)
        say("baked float32 checked")
    except BaseException:
        scaling.apply(-1)
        raise
    left = remaining(scans[0])
    result = BakeResult(
        choices, scaling, checks, left, plan_for(scans[0]) if left else PrecisionPlan(), subnormals
    )
    problems = checks.problems(remaining=bool(left))
    if len(result.scaled) > 1:
        scaling.apply(-1)
        checks.per_cut_float32 = _per_cut(pipe, result, layers, weights, calls, reference)
        scaling.apply()
    if problems:
        scaling.apply(-1)
        raise BakeError("; ".join(problems), result)
    return result


def _cast_psnr(
    pipe: Any,
    dtype: torch.dtype,
    weights: Weights,
    exponents: Exponents,
    calls: Sequence[Call],
    reference: list,
) -> float:
    """PSNR of ``pipe`` cast to ``dtype`` as ``from_pretrained`` loads it (a copy; ``pipe`` stays float32)."""
    copied = cast_copy(pipe, dtype)
    try:
        with weights.running(copied, exponents):
            return run_psnr(copied, calls, reference)
    finally:
        del copied
        gc.collect()  # a pipeline holds reference cycles: free the copy now, not during the next run


def _baked_float16(
    pipe: Any, scaling: Scaling, weights: Weights, calls: Sequence[Call], reference: list
) -> float:
    """``_cast_psnr`` in float16 of ``pipe`` with ``scaling`` applied; ``pipe`` is float32 as before after."""
    scaling.apply()
    try:
        return _cast_psnr(pipe, torch.float16, weights, scaling.exponents, calls, reference)
    finally:
        scaling.apply(-1)


def _candidates(
    placement: str, scaled: list[Choice], moved: list[Choice], measurable: bool
) -> dict[str, list[Choice]]:
    """The placements to bake, by name: both where ``placement`` is measured and both exist."""
    if moved and placement == VALUES:
        return {VALUES: scaled + moved}
    if moved and measurable:
        return {WRITERS: scaled, VALUES: scaled + moved}
    return {WRITERS: scaled}


def _better_placement(float16: dict[str, float]) -> str:
    """The placement whose float16 images are closest to float32; the writers unless the other one
    is better by more than the self-check's tolerance (noise must not move a factor)."""
    values = float16.get(VALUES)
    if values is not None and values > float16[WRITERS] + FLOAT16_TOLERANCE_DB:
        return VALUES
    return WRITERS


def _per_cut(
    pipe: Any, result: BakeResult, layers: dict, weights: Weights, calls: Sequence[Call], reference: list
) -> dict:
    """Float32 PSNR with each scaled cut alone (the ``PER_CUT_SHOWN`` largest k): which cut the eps costs."""
    figures = {}
    for choice in sorted(result.scaled, key=lambda choice: -choice.k)[:PER_CUT_SHOWN]:
        alone = scaling_for(pipe, [choice], layers)
        alone.apply()
        try:
            with weights.running(pipe, alone.exponents):
                figures[choice.cut.name] = worst_psnr(run_images(pipe, calls), reference)
        finally:
            alone.apply(-1)
    return figures
