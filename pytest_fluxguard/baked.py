"""What a baked item's example must satisfy, and how a failure names the cut whose headroom ran out.

Each example runs three times: the baked weights in float16 with plain diffusers (what the file's
users get, no guard), the original in float32 (the reference) and the original in bfloat16. The
baked pixels must be finite and at least as faithful to the reference as bfloat16's, within the
bake's own self-check tolerance. The float16 run records every baked cut's peak, so a failure says
which cut ran past float16's range (and how far its calibration peak was from this example's), or,
when none did, that the loss is precision, not range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from guarded_diffusers import FLOAT16_TOLERANCE_DB, BakedCut, NonFiniteError, psnr, read_bake

from .assertions import describe_non_finite
from .checks import _Check, _Explanation, _first_incident, _where
from .failures import ExampleFailed, failure_class
from .headroom import CutMeter, CutPeak, Headroom, cut_modules
from .inputs import FillInputs
from .options import FluxGuardOptions
from .pipelines import PipelineCache
from .summary import ItemStats
from .target import Target

# How many of a cut's writers and readers a failure lists (Flux's stream has one per block).
_NAMES_SHOWN = 3


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One example's float16 headroom and, for finite pixels, its PSNRs against the original's float32."""

    headroom: Headroom
    baked_db: float | None = None
    bfloat16_db: float | None = None


def _failure_key(verdict: Verdict) -> tuple[str, str | None]:
    """A failure class per cut that ran out, so hypothesis keeps two cuts' failures apart."""
    ran_out = verdict.headroom.ran_out
    if ran_out is not None:
        return "headroom", ran_out.cut.name
    return ("precision" if verdict.baked_db is not None else "non-finite pixels"), None


def _unfaithful(verdict: Verdict) -> str | None:
    """Why the finite baked images are less faithful than bfloat16's, or None when they are not."""
    baked, floor = verdict.baked_db, verdict.bfloat16_db
    if baked is None or floor is None or baked >= floor - FLOAT16_TOLERANCE_DB:
        return None
    return (
        f"baked float16 is {baked:.1f} dB from the original in float32, under the original bfloat16's "
        f"{floor:.1f} dB (tolerance {FLOAT16_TOLERANCE_DB:g} dB)"
    )


def _names(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _scaled(cut: BakedCut) -> str:
    return f"scaled by 2**-{cut.k}" if cut.k else f"not scaled: {cut.breaks or 'calibration fit float16'}"


def _ran_out_lines(found: CutPeak, float32_peak: float | None) -> list[str]:
    cut, dtype = found.cut, found.dtype_name
    lines = [
        f"headroom ran out at cut {cut.name} ({_scaled(cut)}): {dtype} peak {found.peak:.4g} "
        f"against {dtype}'s max {found.maximum:.0f}"
    ]
    calibration = f"calibration peak {cut.peak:.3g} in float32, {cut.peak * 2.0**-cut.k:.3g} once scaled"
    if float32_peak is not None and math.isfinite(float32_peak) and float32_peak > 0:
        needed = max(0, math.ceil(math.log2(float32_peak / found.maximum)))
        calibration += f"; this example reaches {float32_peak:.3g} in float32, which needs k >= {needed}"
    lines += [
        f"  {calibration}",
        f"  written by {_names(cut.writers)}; read by {_names(cut.readers)}",
        "  bake again with calibration calls like this example (or more headroom) before you publish",
    ]
    return lines


def _precision_lines(headroom: Headroom) -> list[str]:
    lines = ["no baked cut ran out of headroom: the loss is precision, not range"]
    closest = headroom.closest
    if closest is not None:
        lines.append(
            f"  closest to float16's max: cut {closest.cut.name} ({_scaled(closest.cut)}) at peak "
            f"{closest.peak:.3g}, {closest.headroom_bits:.1f} bits of headroom"
        )
    return lines


class BakedCheck(_Check):
    """The baked float16 weights, as plain diffusers runs them, against the original (``reference_path``)."""

    def __init__(self, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats):
        super().__init__(target, options, pipelines, stats)
        self.record = read_bake(target.path)
        self.cuts = CutMeter(self.record.cuts)
        try:
            cut_modules(self.pipeline(guarded=False), self.record.cuts)
        except LookupError as error:
            pytest.fail(f"{target.path}: {error}", pytrace=False)

    def original(self, dtype: str) -> Any:
        target = self.target
        return self.pipelines.get(target.reference_path, target.reference_variant, dtype)

    def __call__(self, example: FillInputs) -> dict[str, float]:
        pipe = self.pipeline(guarded=False)
        with self.meter.measuring(pipe), self.cuts.measuring(pipe):
            images = pipe(**example.pipeline_kwargs(), output_type="np").images
        verdict = Verdict(self.cuts.read())
        peaks = {**self.meter.read(), **verdict.headroom.ratios()}
        problem = describe_non_finite(images)
        if problem is None:
            verdict = self._fidelity(example, images, verdict)
            problem = _unfaithful(verdict)
        if problem is not None:
            raise failure_class(*_failure_key(verdict))(problem, example, images, verdict)
        return peaks

    def _fidelity(self, example: FillInputs, images: Any, verdict: Verdict) -> Verdict:
        """``verdict`` with the PSNRs of the baked images and of the original's bfloat16 ones."""
        reference = self.original("float32")(**example.pipeline_kwargs(), output_type="np").images
        bfloat16 = self.original("bfloat16")(**example.pipeline_kwargs(), output_type="np").images
        return dataclasses.replace(
            verdict, baked_db=psnr(images, reference), bfloat16_db=psnr(bfloat16, reference)
        )

    def explain(self, failure: ExampleFailed) -> _Explanation:
        verdict: Verdict = failure.report
        ran_out = verdict.headroom.ran_out
        if ran_out is not None:
            self.stats.note_module(ran_out.cut.name)
            lines = _ran_out_lines(ran_out, self._float32_peak(failure.example, ran_out.cut))
        elif verdict.baked_db is not None:
            lines = _precision_lines(verdict.headroom)
        else:
            lines = self._outside_lines(failure.example, verdict.headroom)
        return _Explanation(failure.problem, lines, failure.images)

    def _float32_peak(self, example: FillInputs, cut: BakedCut) -> float | None:
        """The cut's peak on ``example`` in the original in float32 (the writers have the same names)."""
        meter = CutMeter([cut])
        pipe = self.original("float32")
        with meter.measuring(pipe):
            pipe(**example.pipeline_kwargs(), output_type="np")
        found = meter.read().peaks.get(cut.name)
        return found.peak if found is not None else None

    def _outside_lines(self, example: FillInputs, headroom: Headroom) -> list[str]:
        """Non-finite pixels with every baked cut in range: where the detect-only guard saw it first."""
        target = self.target
        lines = ["no baked cut ran out of headroom: the overflow is outside the baked cuts"]
        if headroom.first_out is not None:
            lines.append(f"  NaN first reached cut {headroom.first_out.cut.name} from outside it")
        try:
            self.pipelines.detecting(target.path, target.variant, target.dtype)(
                **example.pipeline_kwargs(), output_type="np"
            )
        except NonFiniteError as error:
            incident = _first_incident(error.report)
            if incident is not None:
                self.stats.note_module(incident.module)
                lines.append(f"  first to overflow float16: {_where(incident)}")
        if self.record.remaining:
            lines.append(f"  the bake said these still overflow float16: {_names(self.record.remaining)}")
        return lines
