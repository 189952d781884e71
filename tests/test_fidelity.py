"""Recovered means faithful: every fix is measured against float32, held within a memory budget."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import all_finite, fill, hook_count, load, state_snapshot
from diffusers import FluxFillPipeline

from guarded_diffusers import DegradedFixWarning, GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.casting import Float32Island, float32_extra_bytes, tensor_bytes
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.strategies.upcast import UpcastFix
from guarded_diffusers.testing import inject_overflow, tiny_flux_fill_pipeline

SITE = "single_block_mlp"
BLOCK = "transformer.single_transformer_blocks.0"


def parameter_bytes(pipe) -> int:
    return tensor_bytes(module for module in pipe.components.values() if isinstance(module, torch.nn.Module))


def quietly(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


def degraded_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = call()
    return output, [w for w in caught if issubclass(w.category, DegradedFixWarning)]


def test_a_fix_beyond_tolerance_is_degraded_and_the_most_faithful_one_is_kept(saved_model):
    folder, overflowing = saved_model(SITE)
    # Nothing float16 computes is within 1e-9 of float32: both fixes are measured and found wanting.
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_strategies=["clamp", "rescale"],
        guard_tolerance=1e-9,
    )

    output, warned = degraded_warnings(lambda: fill(pipe))

    assert all_finite(output.images)
    [incident] = output.guard_report.incidents
    clamp, rescale = incident.attempts
    assert (clamp.outcome, rescale.outcome) == ("degraded", "degraded")
    assert rescale.error < clamp.error  # rescale is exact but for rounding; clamp cuts the channels
    assert (incident.strategy, incident.error, incident.recovered, incident.degraded) == (
        "rescale",
        rescale.error,
        False,
        True,
    )
    assert "kept: the most faithful" in rescale.detail and "exceeds the tolerance" in incident.detail
    assert output.guard_report.degraded and not output.guard_report.recovered
    assert [fix.strategy for fix in pipe.guard.fixes] == ["rescale"]
    assert len(warned) == 1 and overflowing in str(warned[0].message)
    assert "DEGRADED" in str(output.guard_report)


def test_two_degraded_incidents_in_one_call_warn_once(tmp_path):
    pipe = tiny_flux_fill_pipeline()
    inject_overflow(pipe, "double_block_ff")
    inject_overflow(pipe, SITE, block=1)
    pipe.save_pretrained(tmp_path)
    guarded = load(GuardedFluxFillPipeline, tmp_path, torch.float16, guard_strategies=["clamp"])

    output, warned = degraded_warnings(lambda: fill(guarded))

    assert [incident.degraded for incident in output.guard_report.incidents] == [True, True]
    assert len(warned) == 1
    assert Path(warned[0].filename).name == "conftest.py"  # points at the pipeline's caller (fill)


def test_strict_fidelity_raises_instead_of_keeping_a_degraded_fix(saved_model):
    folder, _ = saved_model(SITE)
    pipe = load(
        GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=["clamp"], guard_fidelity="strict"
    )
    before = state_snapshot(pipe)

    with pytest.raises(NonFiniteError, match="no fix came within tolerance of float32") as raised:
        fill(pipe)

    [incident] = raised.value.report.incidents
    assert [(a.strategy, a.outcome) for a in incident.attempts] == [("clamp", "degraded")]
    assert not incident.recovered
    assert state_snapshot(pipe) == before and hook_count(pipe) == 0


def test_recovered_incident_reports_its_error_region_and_cost_as_json(saved_model):
    folder, _ = saved_model("double_block_ff")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=["upcast"])

    report = json.loads(fill(pipe).guard_report.to_json())

    [incident] = report["incidents"]
    assert incident["recovered"] and not incident["degraded"]
    assert 0 < incident["error"] <= 2**-8
    island = pipe.guard.module(incident["fixed_module"])
    assert incident["extra_bytes"] == tensor_bytes([island]) // 2 > 0  # float16 -> float32 doubles it
    assert incident["measured_module"] == incident["fixed_module"]
    assert report["fixes"] == [
        {
            "strategy": "upcast",
            "module": incident["fixed_module"],
            "extra_bytes": incident["extra_bytes"],
            "error": incident["error"],
        }
    ]


def test_default_budget_declines_an_island_over_five_percent_and_rescale_takes_over(saved_model):
    folder, _ = saved_model(SITE)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    block = pipe.guard.module(BLOCK)
    assert float32_extra_bytes(block) > 0.05 * parameter_bytes(pipe)  # the tiny model's block is 7.4 %

    [incident] = fill(pipe).guard_report.incidents

    guidance, upcast, rescale = incident.attempts
    assert (guidance.outcome, upcast.outcome, rescale.outcome) == ("declined", "declined", "applied")
    assert "guard_max_extra_memory" in upcast.detail
    assert (incident.strategy, incident.recovered, incident.extra_bytes) == ("rescale", True, 0)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float16}


def test_the_guard_refuses_a_plugin_fix_over_budget_and_restores_the_model(saved_model):
    class WholeComponent:
        name = "whole-component"

        def recover(self, location):  # ignores location.memory_budget
            component = location.calls[-1]
            return UpcastFix(component.name, Float32Island(component.module), None, strategy=self.name)

    folder, _ = saved_model(SITE)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    pipe.guard.strategies = [WholeComponent()]
    before = state_snapshot(pipe)

    with pytest.raises(NonFiniteError, match="whole-component over budget"):
        fill(pipe)

    [attempt] = pipe.guard.last_report.incidents[0].attempts
    assert attempt.extra_bytes > 0.05 * parameter_bytes(pipe)
    assert state_snapshot(pipe) == before and hook_count(pipe) == 0


def test_every_report_lists_the_fixes_in_force_with_their_cost(saved_model):
    folder, _ = saved_model(SITE)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=0.1)
    first = fill(pipe).guard_report

    later = fill(pipe).guard_report

    assert later.incidents == []
    [held] = later.fixes
    assert (held.strategy, held.module) == ("upcast", BLOCK)
    assert held.extra_bytes == first.incidents[0].extra_bytes == later.extra_bytes > 0
    assert str(later).startswith("no incidents\nfixes in force: upcast on " + BLOCK)
    pipe.guard.reset()
    assert fill(pipe).guard_report.fixes[0].strategy == "upcast"  # the same overflow, fixed again


def test_budget_in_bytes_zero_allows_only_fixes_that_cost_nothing(saved_model):
    folder, _ = saved_model("double_block_ff")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=0)

    [incident] = fill(pipe).guard_report.incidents

    assert (incident.strategy, incident.extra_bytes, incident.recovered) == ("rescale", 0, True)


@pytest.mark.parametrize("guidance_scale", [100.0, 1000.0])
def test_guidance_overflow_is_fixed_in_place_at_no_memory_cost(saved_model, guidance_scale):
    folder, _ = saved_model()
    reference = fill(load(FluxFillPipeline, folder, torch.float32), guidance_scale=guidance_scale).images
    bfloat16 = fill(load(FluxFillPipeline, folder, torch.bfloat16), guidance_scale=guidance_scale).images
    island = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_strategies=["upcast"],
        guard_max_extra_memory=1.0,
    )
    island_images = fill(island, guidance_scale=guidance_scale).images
    assert island.guard.fixes[0].module_name == "transformer"  # the float32-island answer: 2x the transformer
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    memory = parameter_bytes(pipe)

    output = fill(pipe, guidance_scale=guidance_scale)

    [incident] = output.guard_report.incidents
    assert (incident.strategy, incident.fixed_module, incident.recovered) == (
        "guidance",
        "transformer.time_text_embed",
        True,
    )
    assert parameter_bytes(pipe) == memory and incident.extra_bytes == 0
    assert psnr(output.images, reference) >= psnr(island_images, reference) - 1.0
    assert psnr(output.images, reference) >= psnr(bfloat16, reference) + 20.0
    assert fill(pipe, guidance_scale=guidance_scale).guard_report.incidents == []  # the fix is held


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"guard_fidelity": "loose"}, "`guard_fidelity` must be one of 'best', 'strict'"),
        ({"guard_tolerance": 0.0}, "`guard_tolerance` must be a relative error in"),
        ({"guard_tolerance": float("nan")}, "`guard_tolerance`"),
        ({"guard_max_extra_memory": -1}, "`guard_max_extra_memory`"),
        ({"guard_max_extra_memory": 1.5}, "`guard_max_extra_memory` must be a fraction in"),
        ({"guard_max_extra_memory": True}, "`guard_max_extra_memory`"),
        ({"guard_max_extra_memory": "5%"}, "`guard_max_extra_memory`"),
    ],
)
def test_bad_guard_settings_fail_before_loading(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        GuardedFluxFillPipeline.from_pretrained(tmp_path / "not-loaded", **settings)


def test_a_plan_over_the_memory_budget_is_refused_whole(saved_model, tmp_path):
    folder, _ = saved_model(SITE)
    roomy = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=0.1)
    fill(roomy)
    plan = roomy.guard.plan().save(tmp_path / "plan.json")  # a float32 island on the block: 7.4 %
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before = state_snapshot(pipe)

    with pytest.raises(ValueError, match=r"guard_max_extra_memory"):
        pipe.guard.apply_plan(plan)

    assert state_snapshot(pipe) == before and pipe.guard.fixes == []
    roomy.guard.apply_plan(plan)  # already held: nothing changes, the cost stays recorded
    assert roomy.guard.in_force()[0].extra_bytes > 0


def test_fixes_of_one_call_stay_within_the_budget_together_and_survive_a_save(tmp_path):
    pipe = tiny_flux_fill_pipeline()
    inject_overflow(pipe, "double_block_ff")
    inject_overflow(pipe, SITE, block=1)
    pipe.save_pretrained(tmp_path / "model")
    guarded = load(GuardedFluxFillPipeline, tmp_path / "model", torch.float16, guard_max_extra_memory=0.1)

    report = quietly(lambda: fill(guarded)).guard_report

    assert len(report.incidents) == 2
    assert report.extra_bytes <= 0.1 * (parameter_bytes(guarded) - report.extra_bytes)
    held = guarded.guard.in_force()
    guarded.save_pretrained(tmp_path / "saved")  # lifts the fixes and re-applies them within the budget
    assert guarded.guard.in_force() == held  # with their measured cost and error
