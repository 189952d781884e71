"""Run one zero-code item: fuzz a (variant, dtype, mode) with hypothesis and explain the minimal failure.

Each example runs from the saved weights: the guard's fixes are reset after every guarded call,
so an example fails or passes the same way whenever hypothesis replays it while shrinking. A raw
example runs behind a detect-only guard, which fails it on the first overflow: a NaN or inf, or a
residual stream at the dtype's maximum, where diffusers and transformers clip and the image stays
finite but wrong. The rest of a raw failure's explanation (the plain pipeline's pixels, black or
silently clipped, and what the full guard makes of it) runs once, on the shrunk example.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import textwrap
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given

from guarded_diffusers import DegradedFixWarning, GuardReport, Incident, NonFiniteError, psnr

from .artifacts import folder_for, save_failure
from .assertions import describe_non_finite
from .collect import Target
from .failures import ExampleFailed, FluxGuardFailure
from .inputs import FillInputs
from .options import FluxGuardOptions
from .pipelines import PipelineCache
from .profile import fluxguard_settings
from .strategies import fill_inputs
from .summary import ItemStats

# The stages whose components transformers builds (T5 clamps its residual stream at max - 1000);
# diffusers clips the others (Flux's residual stream at +-65504 in float16).
_TRANSFORMERS_STAGES = ("pooled_prompt_embeds", "prompt_embeds")


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
        raise ExampleFailed(problem, example, images, report)


@dataclasses.dataclass
class _Explanation:
    """A minimal failure told in full: the first line, what the guard saw, the pixels to save."""

    problem: str
    lines: list[str]
    images: Any


class _Check:
    """Runs one example in one mode; raises ExampleFailed when it goes wrong."""

    def __init__(self, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats):
        self.target, self.options, self.pipelines, self.stats = target, options, pipelines, stats

    def pipeline(self, guarded: bool) -> Any:
        return self.pipelines.get(self.target.path, self.target.variant, self.target.dtype, guarded=guarded)

    def guarded_call(self, example: FillInputs) -> tuple[Any, GuardReport]:
        """Output (None if the guard gave up) and report of GuardedFluxFillPipeline; fixes undone after."""
        pipe = self.pipeline(guarded=True)
        try:
            output = pipe(**example.pipeline_kwargs(), output_type="np")
        except NonFiniteError as error:
            return None, error.report
        finally:
            pipe.guard.reset()
        return output, output.guard_report


class RawCheck(_Check):
    """FluxFillPipeline as it ships must neither overflow the dtype nor produce a non-finite pixel.

    Each example runs through a detect-only guard on the raw weights: the plain pipeline's pixels
    bit for bit when nothing overflows, at the cost of one device reduction per block and stage.
    On an overflow it stops at the first stage that overflowed; only the minimal example is then
    run through the plain pipeline, to tell a black image from a silently clipped one.
    """

    def __call__(self, example: FillInputs) -> None:
        target = self.target
        pipe = self.pipelines.detecting(target.path, target.variant, target.dtype)
        report, message = None, ""
        try:
            output = pipe(**example.pipeline_kwargs(), output_type="np")
        except NonFiniteError as error:
            report, message = error.report, str(error).splitlines()[0]
        # Raised outside the except block: hypothesis tells failures apart by their context too.
        if report is not None:
            incident = _first_incident(report)
            problem = f"{target.dtype} overflows at {_where(incident)}" if incident else message
            raise ExampleFailed(problem, example, None, report)
        _require_finite(output.images, example)

    def explain(self, failure: ExampleFailed) -> _Explanation:
        example = failure.example
        images = self.pipeline(guarded=False)(**example.pipeline_kwargs(), output_type="np").images
        _, report = self.guarded_call(example)
        incident = _first_incident(failure.report, report)
        module = incident.module if incident is not None else None
        self.stats.note_module(module)
        guard_lines = _report_lines("the same example through GuardedFluxFillPipeline", report)
        black = describe_non_finite(images)
        if black is not None:
            lines = [f"first module to go non-finite: {module or 'not located by the guard'}", *guard_lines]
            return _Explanation(black, lines, images)
        if incident is None:
            return _Explanation(failure.problem, guard_lines, images)
        return _Explanation(_silently_clipped(incident, self.target.dtype), guard_lines, images)


class GuardedCheck(_Check):
    """GuardedFluxFillPipeline must return finite pixels from faithful fixes only (recovered, not
    degraded), close to float32 if --fluxguard-min-psnr asks."""

    def __call__(self, example: FillInputs) -> None:
        output, report = self.guarded_call(example)
        self.stats.recovered += sum(incident.recovered for incident in report.incidents)
        self.stats.note_module(_first_module(report))
        if output is None:
            raise ExampleFailed("the guard could not recover a non-finite stage", example, None, report)
        _require_finite(output.images, example, report)
        degraded = next((incident for incident in report.incidents if incident.degraded), None)
        if degraded is not None:
            raise ExampleFailed(_degraded(degraded), example, output.images, report)
        if self.options.min_psnr is not None:
            self._require_fidelity(example, output.images, report)

    def _require_fidelity(self, example: FillInputs, images: Any, report: GuardReport) -> None:
        reference = self.pipelines.get(self.target.path, self.target.reference_variant, "float32")
        expected = reference(**example.pipeline_kwargs(), output_type="np").images
        value = psnr(images, expected)
        if value < self.options.min_psnr:
            problem = (
                f"PSNR {value:.2f} dB against float32 is below --fluxguard-min-psnr {self.options.min_psnr:g}"
            )
            raise ExampleFailed(problem, example, images, report)

    def explain(self, failure: ExampleFailed) -> _Explanation:
        return _Explanation(failure.problem, _report_lines("guard report", failure.report), failure.images)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No warnings logged, no progress bars and no DegradedFixWarning while an item runs.

    Every example would repeat them (loader notes, prompt truncation, one guard line per incident)
    into a failing item's captured output; the item's own message says what matters, once.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegradedFixWarning)
            yield
    finally:
        for library, (verbosity, progress_bar) in zip(libraries, saved, strict=True):
            library.set_verbosity(verbosity)
            if progress_bar:
                library.enable_progress_bar()


def run_item(
    item: pytest.Item, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats
) -> None:
    """Fuzz ``target`` for ``options.examples`` examples; raise FluxGuardFailure with the minimal failure."""
    with _quiet_libraries():
        _run_item(item, target, options, pipelines, stats)


def _run_item(
    item: pytest.Item, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats
) -> None:
    check = (GuardedCheck if target.mode == "guarded" else RawCheck)(target, options, pipelines, stats)
    multiple = 2 * check.pipeline(guarded=False).vae_scale_factor
    if options.max_size < multiple:
        pytest.fail(
            f"--fluxguard-max-size {options.max_size} is below this model's smallest size, {multiple} px.",
            pytrace=False,
        )

    def run_example(example: FillInputs) -> None:
        stats.examples += 1
        try:
            check(example)
        except ExampleFailed:
            stats.failures += 1
            raise

    # A database key per item, as hypothesis' pytest plugin gives each parametrized case.
    run_example._hypothesis_internal_add_digest = item.nodeid.encode()  # type: ignore[attr-defined]
    strategy = fill_inputs(
        max_size=options.max_size,
        multiple=multiple,
        max_steps=options.max_steps,
        max_sequence_length=options.max_sequence_length,
        max_guidance=options.max_guidance,
    )
    test = given(example=strategy)(fluxguard_settings(item.config.rootpath, options.examples)(run_example))
    try:
        test()
    except Exception as error:  # one ExampleFailed, or a group of distinct ones, each shrunk
        failures = _example_failures(error)
        if failures is None:
            raise
        raise FluxGuardFailure(_explain(item, options, check, failures)) from None


def _example_failures(error: BaseException) -> list[ExampleFailed] | None:
    """The ExampleFailed in ``error`` (an exception group's leaves too); None if anything else is there.

    Duck-typed: on Python 3.10 hypothesis raises the ``exceptiongroup`` backport's groups.
    """
    if isinstance(error, ExampleFailed):
        return [error]
    members = getattr(error, "exceptions", None)
    if not isinstance(members, tuple) or not members:
        return None
    found = [_example_failures(member) for member in members]
    if any(leaves is None for leaves in found):
        return None
    return [leaf for leaves in found for leaf in leaves or []]


def _explain(
    item: pytest.Item,
    options: FluxGuardOptions,
    check: RawCheck | GuardedCheck,
    failures: list[ExampleFailed],
) -> str:
    """The first failure in full; others in a line each (hypothesis replays them first next run)."""
    first, *others = failures
    explained = check.explain(first)
    saved = save_failure(folder_for(options.artifacts, item.name), first.example, explained.images)
    lines = [f"{item.name}: {explained.problem}", *explained.lines]
    lines += ["saved:", *(f"  {path}" for path in saved)]
    lines += getattr(first, "__notes__", [])
    if others:
        lines.append(f"{len(others)} more distinct failure(s), replayed first on the next run:")
        lines += [f"  {other.problem}" for other in others]
    return "\n".join(lines)
