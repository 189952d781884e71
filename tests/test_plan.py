"""Precision plans: saved after a run, re-applied before the first step, refused when they do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fill, hook_count, load, state_snapshot

from guarded_diffusers import GuardedFluxFillPipeline, PrecisionPlan
from guarded_diffusers.plan import PlanEntry


def _run_and_save_plan(folder, strategy, path):
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=[strategy])
    output = fill(pipe)
    pipe.guard.plan().save(path)
    return output


@pytest.mark.parametrize(
    ("site", "strategy"), [("single_block_mlp", "upcast"), ("t5_ff", "rescale"), ("vae_decoder", "clamp")]
)
def test_plan_round_trip_runs_the_same_inputs_without_incidents(saved_model, tmp_path, site, strategy):
    folder, overflowing = saved_model(site)
    first = _run_and_save_plan(folder, strategy, tmp_path / "plan.json")
    [entry] = json.loads((tmp_path / "plan.json").read_text())["fixes"]
    assert entry["strategy"] == strategy and overflowing.startswith(entry["module"])

    planned = load(GuardedFluxFillPipeline, folder, torch.float16, guard_plan=tmp_path / "plan.json")
    assert [fix.strategy for fix in planned.guard.fixes] == [strategy]
    output = fill(planned)

    assert output.guard_report.incidents == []
    np.testing.assert_array_equal(output.images, first.images)


def test_reset_reverts_plan_fixes_to_the_weights_as_saved(saved_model, tmp_path):
    folder, _ = saved_model("clip_mlp")
    _run_and_save_plan(folder, "upcast", tmp_path / "plan.json")
    unplanned = state_snapshot(load(GuardedFluxFillPipeline, folder, torch.float16))

    planned = load(GuardedFluxFillPipeline, folder, torch.float16, guard_plan=str(tmp_path / "plan.json"))
    assert state_snapshot(planned) != unplanned
    planned.guard.reset()
    assert state_snapshot(planned) == unplanned
    assert hook_count(planned) == 0


def test_from_pipe_takes_a_plan_object(saved_model, tmp_path):
    folder, _ = saved_model("double_block_ff")
    _run_and_save_plan(folder, "rescale", tmp_path / "plan.json")
    source = load(GuardedFluxFillPipeline, folder, torch.float16)
    pipe = GuardedFluxFillPipeline.from_pipe(source, guard_plan=PrecisionPlan.load(tmp_path / "plan.json"))
    assert fill(pipe).guard_report.incidents == []


def _plan_file(tmp_path, fixes, **top):
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps({"format": "guarded-diffusers/precision-plan", "version": 1, "fixes": fixes, **top})
    )
    return path


UPCAST_BLOCK = {
    "strategy": "upcast",
    "module": "transformer.single_transformer_blocks.0",
    "module_class": "FluxSingleTransformerBlock",
    "params": {"dtype": "float32", "output_absmax": 6.5},
}


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ("{not json", "not JSON"),
        ('{"format": "guarded-diffusers/precision-plan", "version": 1, "fixes": [], "x": NaN}', "not JSON"),
        ('{"fixes": []}', 'expected a JSON object with "format"'),
        (
            '{"format": "guarded-diffusers/precision-plan", "version": 7, "fixes": []}',
            "version 7 is not supported",
        ),
        (
            '{"format": "guarded-diffusers/precision-plan", "version": 1, "fixes": [{"strategy": "upcast"}]}',
            "fix 0 must have exactly the keys",
        ),
        (
            json.dumps(
                {
                    "format": "guarded-diffusers/precision-plan",
                    "version": 1,
                    "fixes": [{**UPCAST_BLOCK, "strategy": "magic"}],
                }
            ),
            r"unknown strategy 'magic'; known: clamp, rescale, upcast",
        ),
    ],
)
def test_malformed_plans_fail_before_loading_the_model(tmp_path, contents, message):
    (tmp_path / "plan.json").write_text(contents)
    with pytest.raises(ValueError, match=message) as raised:
        GuardedFluxFillPipeline.from_pretrained(tmp_path / "not-loaded", guard_plan=tmp_path / "plan.json")
    assert "plan" in str(raised.value)


def test_missing_plan_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot read precision plan .*missing\.json"):
        GuardedFluxFillPipeline.from_pretrained(tmp_path, guard_plan=tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("fix", "message"),
    [
        (
            {**UPCAST_BLOCK, "module": "transformer.single_transformer_blocks.9"},
            "has no submodule 'single_transformer_blocks.9'",
        ),
        ({**UPCAST_BLOCK, "module": "unet.mid_block"}, "has no component 'unet'"),
        (
            {**UPCAST_BLOCK, "module_class": "UNetMidBlock2D"},
            "is a FluxSingleTransformerBlock here but a UNetMidBlock2D in the plan",
        ),
        ({**UPCAST_BLOCK, "params": {"dtype": "float64"}}, "only makes float32 islands"),
        ({**UPCAST_BLOCK, "strategy": "clamp", "params": {"limit": "big"}}, "positive finite `limit`"),
        (
            {
                **UPCAST_BLOCK,
                "strategy": "rescale",
                "module": "transformer.single_transformer_blocks.0.proj_mlp",
                "module_class": "Linear",
                "params": {"producer_shifts": [[4096, 3]]},
            },
            "name channels outside 0..127",
        ),
    ],
)
def test_a_plan_that_does_not_fit_the_model_is_refused_whole(saved_model, tmp_path, fix, message):
    folder, _ = saved_model()
    path = _plan_file(tmp_path, [UPCAST_BLOCK, fix])
    with pytest.raises(ValueError, match=message):
        load(GuardedFluxFillPipeline, folder, torch.float16, guard_plan=path)

    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before = state_snapshot(pipe)
    with pytest.raises(ValueError, match="does not fit"):
        pipe.guard.apply_plan(PrecisionPlan.load(path))
    assert pipe.guard.fixes == []
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


def test_a_strategy_with_non_json_parameters_is_named_on_save(tmp_path):
    entry = PlanEntry("upcast", "transformer.proj_out", "Linear", {"output_absmax": float("nan")})
    with pytest.raises(ValueError, match=r"Strategy 'upcast' described its fix on transformer\.proj_out"):
        PrecisionPlan((entry,)).save(tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize(("site", "strategy"), [("single_block_mlp", "rescale"), ("vae_encoder", "upcast")])
def test_save_pretrained_writes_the_weights_as_loaded_and_keeps_the_fixes(
    saved_model, tmp_path, site, strategy
):
    folder, _ = saved_model(site)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=[strategy])
    as_loaded = state_snapshot(pipe)
    first = fill(pipe)
    fixed = state_snapshot(pipe)

    pipe.save_pretrained(tmp_path)

    assert state_snapshot(load(GuardedFluxFillPipeline, tmp_path, torch.float16)) == as_loaded
    assert state_snapshot(pipe) == fixed
    again = fill(pipe)
    assert again.guard_report.incidents == []
    np.testing.assert_array_equal(again.images, first.images)
