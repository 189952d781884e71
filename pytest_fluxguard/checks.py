"""What one example must satisfy, raw or guarded, and how a failure is told.

Each check runs one example and raises an ``ExampleFailed`` subclass per kind of failure and
offending module (so hypothesis keeps failures at different modules apart), or returns the
example's component peaks for the targeted search. ``explain`` tells the minimal failure in full.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any

from guarded_diffusers import GuardReport, Incident, NonFiniteError, psnr

from .assertions import describe_non_finite
from .failures import ExampleFailed, failure_class
from .inputs import FillInputs
from .options import FluxGuardOptions
from .peaks import PeakMeter
from .pipelines import PipelineCache
from .summary import ItemStats
from .target import Target

# The stages whose components transformers builds (T5 clamps its residual stream at max - 1000);
# diffusers clips the others (Flux's residual stream at +-65504 in float16).
_TRANSFORMERS_STAGES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _report_lines(title: str, report: GuardReport | None) -> list[str]:
    if report is None or not report.incidents:
        return [f"{title}: no incidents"]
    return [f"{title}:", textwrap.indent(str(report), "  ")]


def _first_incident(*reports: GuardReport | None) -> Incident | None:
    """The first incident of the first report that has one."""
    return next((report.incidents[0] for report in reports if report is not None and report.incidents), None)


def _first_module(report: GuardReport | None) -> str | None:
    incident = _first_incident(report)
    return incident.module if incident is not None else None


def _where(incident: Incident) -> str:
    step = f" step {incident.step}" if incident.step is not None else ""
    return f"{incident.stage}{step} in {incident.module}"


def _how_far(incident: Incident, dtype: str) -> str:
    """How far past the dtype's range the overflowing module's float32 output goes."""
    import torch

    limit = torch.finfo(getattr(torch, dtype)).max
    maximum = f"{dtype}'s max {limit:.0f}" if limit < 1e6 else f"{dtype}'s max {limit:.3g}"
    peak = incident.absmax
    if peak is None:
        return f"past {maximum} (float32 peak not measured)"
    if not math.isfinite(peak):
        return f"float32 peak {peak} (it overflows float32 too)"
    if peak > limit:
        return f"float32 peak {peak:.2g} = {peak / limit:.2g}x {maximum}"
    return f"float32 peak {peak:.4g}, within 1000 of {maximum}"  # the guard's saturation band


def _silently_clipped(incident: Incident, dtype: str) -> str:
    library = "transformers" if incident.stage in _TRANSFORMERS_STAGES else "diffusers"
    return (
        f"silently clipped at {_where(incident)}: {_how_far(incident, dtype)}; {library} clipped the "
        f"values there to fit {dtype}, so the image is finite but silently wrong"
    )


def _degraded(incident: Incident) -> str:
    return (
        f"degraded at {_where(incident)}: the guard kept {incident.strategy} on {incident.fixed_module}, "
        f"its most faithful finite fix, but {incident.detail or 'it is not within tolerance of float32'}; "
        "the image is finite and may be far from float32's"
    )


def _require_finite(images: Any, example: FillInputs, report: GuardReport | None = None) -> None:
    problem = describe_non_finite(images)
    if problem is not None:
        raise failure_class("non-finite pixels")(problem, example, images, report)


@dataclasses.dataclass
class _Explanation:
    """A minimal failure told in full: the first line, what the guard saw, the pixels to save."""

    problem: str
    lines: list[str]
    images: Any


class _Check:
    """Runs one example in one mode; raises ExampleFailed when it goes wrong, else returns the peaks."""

    def __init__(self, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats):
        self.target, self.options, self.pipelines, self.stats = target, options, pipelines, stats
        self.meter = PeakMeter()

    def pipeline(self, guarded: bool) -> Any:
        target = self.target
        return self.pipelines.get(
            target.path, target.variant, target.dtype, guarded=guarded, lora=target.lora
        )

    def guarded_call(self, example: FillInputs) -> tuple[Any, GuardReport]:
        """Output (None if the guard gave up) and report of the guarded pipeline; fixes undone after."""
        pipe = self.pipeline(guarded=True)
        try:
            with self.meter.measuring(pipe):
                output = pipe(**example.pipeline_kwargs(), output_type="np")
        except NonFiniteError as error:
            return None, error.report
        finally:
            pipe.guard.reset()
        return output, output.guard_report


class RawCheck(_Check):
    """The pipeline as it ships must neither overflow the dtype nor produce a non-finite pixel.

    Each example runs through a detect-only guard on the raw weights: the plain pipeline's pixels
    bit for bit when nothing overflows, at the cost of one device reduction per block and stage.
    On an overflow it stops at the first stage that overflowed; only the minimal example is then
    run through the plain pipeline, to tell a black image from a silently clipped one.
    """

    def __call__(self, example: FillInputs) -> dict[str, float]:
        target = self.target
        pipe = self.pipelines.detecting(target.path, target.variant, target.dtype, lora=target.lora)
        report, message = None, ""
        try:
            with self.meter.measuring(pipe):
                output = pipe(**example.pipeline_kwargs(), output_type="np")
        except NonFiniteError as error:
            report, message = error.report, str(error).splitlines()[0]
        # Raised outside the except block: hypothesis tells failures apart by their context too.
        if report is not None:
            incident = _first_incident(report)
            module = incident.module if incident is not None else None
            problem = f"{target.dtype} overflows at {_where(incident)}" if incident else message
            raise failure_class("overflow", module)(problem, example, None, report)
        _require_finite(output.images, example)
        return self.meter.read()

    def explain(self, failure: ExampleFailed) -> _Explanation:
        example = failure.example
        images = self.pipeline(guarded=False)(**example.pipeline_kwargs(), output_type="np").images
        _, report = self.guarded_call(example)
        incident = _first_incident(failure.report, report)
        module = incident.module if incident is not None else None
        self.stats.note_module(module)
        guarded = type(self.pipeline(guarded=True)).__name__
        guard_lines = _report_lines(f"the same example through {guarded}", report)
        black = describe_non_finite(images)
        if black is not None:
            lines = [f"first module to go non-finite: {module or 'not located by the guard'}", *guard_lines]
            return _Explanation(black, lines, images)
        if incident is None:
            return _Explanation(failure.problem, guard_lines, images)
        return _Explanation(_silently_clipped(incident, self.target.dtype), guard_lines, images)


class GuardedCheck(_Check):
    """The guarded pipeline must return finite pixels from faithful fixes only (recovered, not
    degraded), close to float32 if --fluxguard-min-psnr asks."""

    def __call__(self, example: FillInputs) -> dict[str, float]:
        output, report = self.guarded_call(example)
        self.stats.recovered += sum(incident.recovered for incident in report.incidents)
        self.stats.note_module(_first_module(report))
        if output is None:
            unrecovered = next((i for i in report.incidents if not i.recovered), _first_incident(report))
            where = unrecovered.module if unrecovered is not None else None
            problem = "the guard could not recover a non-finite stage"
            raise failure_class("not recovered", where)(problem, example, None, report)
        _require_finite(output.images, example, report)
        degraded = next((incident for incident in report.incidents if incident.degraded), None)
        if degraded is not None:
            raise failure_class("degraded", degraded.module)(
                _degraded(degraded), example, output.images, report
            )
        if self.options.min_psnr is not None:
            self._require_fidelity(example, output.images, report)
        return self.meter.read()

    def _require_fidelity(self, example: FillInputs, images: Any, report: GuardReport) -> None:
        target = self.target
        reference = self.pipelines.get(target.path, target.reference_variant, "float32", lora=target.lora)
        expected = reference(**example.pipeline_kwargs(), output_type="np").images
        value = psnr(images, expected)
        if value < self.options.min_psnr:
            problem = (
                f"PSNR {value:.2f} dB against float32 is below --fluxguard-min-psnr {self.options.min_psnr:g}"
            )
            raise failure_class("psnr")(problem, example, images, report)

    def explain(self, failure: ExampleFailed) -> _Explanation:
        return _Explanation(failure.problem, _report_lines("guard report", failure.report), failure.images)
