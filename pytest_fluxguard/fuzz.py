"""Run one zero-code item: fuzz a (variant, dtype, mode) with hypothesis and explain the minimal failure.

Each example runs from the saved weights: the guard's fixes are reset after every guarded call,
so an example fails or passes the same way whenever hypothesis replays it while shrinking. The
expensive diagnosis of a raw failure (which module went non-finite first) runs once, on the
shrunk example, by re-running it through GuardedFluxFillPipeline on the same modules.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from hypothesis import given

from guarded_diffusers import GuardReport, NonFiniteError
from guarded_diffusers.fidelity import psnr

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


def _report_lines(title: str, report: GuardReport | None) -> list[str]:
    if report is None or not report.incidents:
        return [f"{title}: no incidents"]
    return [f"{title}:", textwrap.indent(str(report), "  ")]


def _first_module(report: GuardReport | None) -> str | None:
    incidents = report.incidents if report is not None else []
    return incidents[0].module if incidents else None


def _require_finite(images: Any, example: FillInputs, report: GuardReport | None = None) -> None:
    problem = describe_non_finite(images)
    if problem is not None:
        raise ExampleFailed(problem, example, images, report)


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
    """FluxFillPipeline as it ships must never produce a non-finite pixel."""

    def __call__(self, example: FillInputs) -> None:
        output = self.pipeline(guarded=False)(**example.pipeline_kwargs(), output_type="np")
        _require_finite(output.images, example)

    def diagnose(self, failure: ExampleFailed) -> list[str]:
        _, report = self.guarded_call(failure.example)
        module = _first_module(report)
        self.stats.note_module(module)
        return [
            f"first module to go non-finite: {module or 'not located by the guard'}",
            *_report_lines("the same example through GuardedFluxFillPipeline", report),
        ]


class GuardedCheck(_Check):
    """GuardedFluxFillPipeline must return finite pixels, close to float32 if --fluxguard-min-psnr asks."""

    def __call__(self, example: FillInputs) -> None:
        output, report = self.guarded_call(example)
        self.stats.recovered += sum(incident.recovered for incident in report.incidents)
        self.stats.note_module(_first_module(report))
        if output is None:
            raise ExampleFailed("the guard could not recover a non-finite stage", example, None, report)
        _require_finite(output.images, example, report)
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

    def diagnose(self, failure: ExampleFailed) -> list[str]:
        return _report_lines("guard report", failure.report)


def run_item(
    item: pytest.Item, target: Target, options: FluxGuardOptions, pipelines: PipelineCache, stats: ItemStats
) -> None:
    """Fuzz ``target`` for ``options.examples`` examples; raise FluxGuardFailure with the minimal failure."""
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
    except ExampleFailed as failure:
        raise FluxGuardFailure(_explain(item, options, check, failure)) from None


def _explain(
    item: pytest.Item, options: FluxGuardOptions, check: RawCheck | GuardedCheck, failure: ExampleFailed
) -> str:
    saved = save_failure(folder_for(options.artifacts, item.name), failure.example, failure.images)
    lines = [f"{item.name}: {failure.problem}", *check.diagnose(failure)]
    lines += ["saved:", *(f"  {path}" for path in saved)]
    lines += getattr(failure, "__notes__", [])
    return "\n".join(lines)
