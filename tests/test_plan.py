"""Precision plans: saved after a run, re-applied before the first step, refused when they do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fill, hook_count, load, state_snapshot

from guarded_diffusers import GuardedFluxFillPipeline, PrecisionPlan, hookimpl, plugin_manager
from guarded_diffusers.core.plan import FORMAT, PlanEntry


def _run_and_save_plan(folder, strategy, path):
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=[strategy])
    output = fill(pipe)
    pipe.guard.plan().save(path)
    return output


@pytest.mark.parametrize(
    ("site", "strategy"),
    [
        ("double_block_ff", "upcast"),  # its float32 island fits the default 5 % budget
        ("t5_ff", "rescale"),
        ("vae_decoder", "rescale"),
        ("vae_decoder", "clamp"),
    ],
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


# Plans here hold a float32 island on a whole single block: 7.4 % of the tiny pipeline, over the
# guard's default 5 % budget (a block is well under 1 % of Flux); the budget is tested on its own.
ROOMY = 0.1
UPCAST_BLOCK = {
    "strategy": "upcast",
    "module": "transformer.single_transformer_blocks.0",
    "module_class": "FluxSingleTransformerBlock",
    "params": {"dtype": "float32", "output_absmax": 6.5},
}
# A valid fix before the bad one in each refused plan: refusal must undo it too.
UPCAST_OTHER_BLOCK = {**UPCAST_BLOCK, "module": "transformer.single_transformer_blocks.1"}


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
            r"fix 0 \(transformer\.single_transformer_blocks\.0\), `strategy`: unknown strategy 'magic'; "
            r"known: clamp, (.+, )?upcast",
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
    path = _plan_file(tmp_path, [UPCAST_OTHER_BLOCK, fix])
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


# -- hardening: every bad plan is one ValueError naming plan, fix and field; the model stays as it was --

PRODUCER = "transformer.single_transformer_blocks.0.proj_mlp"  # Linear 32 -> 128
CONSUMER = "transformer.single_transformer_blocks.0.proj_out"  # Linear 160 -> 32; mlp channels at 32..159
RESCALE = {
    "strategy": "rescale",
    "module": PRODUCER,
    "module_class": "Linear",
    "params": {
        "producer_shifts": [[0, 3]],
        "consumer_shifts": {CONSUMER: [[32, 3]]},
        "relative_error": 0.001,
    },
}
CLAMP = {"strategy": "clamp", "module": CONSUMER, "module_class": "Linear", "params": {"limit": 32752.0}}


def _rescale(**params):
    return {**RESCALE, "params": {**RESCALE["params"], **params}}


def _clamp(limit):
    return {**CLAMP, "params": {"limit": limit}}


def _upcast(**params):
    return {**UPCAST_BLOCK, "params": {**UPCAST_BLOCK["params"], **params}}


@pytest.mark.parametrize(
    ("fix", "field", "message"),
    [
        (
            _rescale(producer_shifts=[[0, 2000]]),
            "params",
            r"`producer_shifts`: exponent 2000 .* outside 1\.\.15",
        ),
        (_rescale(consumer_shifts={CONSUMER: [[32, 2000]]}), "params", "outside 1..15"),
        (_rescale(producer_shifts=[[0, 0]]), "params", "outside 1..15"),
        (_rescale(producer_shifts=[[0, 15]]), "params", "flushes weights of .*proj_mlp to zero"),
        (_rescale(producer_shifts=[[True, 3]]), "params", "integers"),
        (_rescale(producer_shifts=[[1.5, 3]]), "params", "integers"),
        (_rescale(producer_shifts=[[0, 3], [0, 4]]), "params", "channel 0 is shifted twice"),
        (_rescale(producer_shifts={"0": 3}), "params", "non-empty"),
        (_rescale(producer_shifts=[[0]]), "params", "integers"),
        (_rescale(consumer_shifts={}), "params", "`consumer_shifts` is empty"),
        ({**RESCALE, "params": {"producer_shifts": [[0, 3]]}}, "params", "`consumer_shifts` is empty"),
        (_rescale(consumer_shifts=[[CONSUMER, [[32, 3]]]]), "params", "`consumer_shifts` is an object"),
        (_rescale(consumer_shifts={PRODUCER + "x": [[32, 3]]}), "params", "has no submodule"),
        (_rescale(consumer_shifts={CONSUMER: [[160, 3]]}), "params", r"outside 0\.\.159"),
        (
            _rescale(consumer_shifts={"transformer.single_transformer_blocks.0.attn.norm_q": [[0, 3]]}),
            "params",
            "not RMSNorm",
        ),
        (_rescale(consumer_shifts={PRODUCER: [[0, 3]]}), "params", "the producer itself"),
        (_rescale(relative_error="small"), "params", "`relative_error`"),
        (_rescale(producer_shift=[[0, 3]]), "params", "unknown parameter `'producer_shift'`"),
        (
            {
                **RESCALE,
                "module": "transformer.single_transformer_blocks.0",
                "module_class": "FluxSingleTransformerBlock",
            },
            "params",
            "Linear or convolution",
        ),
        (_clamp(True), "params", "positive finite `limit`"),
        (_clamp(-1), "params", "positive finite `limit`"),
        (_clamp(1e6), "params", "no larger than 65504"),
        (_clamp(10**400), "params", "no larger than 65504"),
        ({**CLAMP, "params": {}}, "params", "missing parameter `'limit'`"),
        (_upcast(dtype=32), "params", "only makes float32 islands"),
        (_upcast(output_absmax=True), "params", "`output_absmax`"),
        (_upcast(output_absmax=-1.0), "params", "`output_absmax`"),
        ({**UPCAST_BLOCK, "module": "transformer.nowhere"}, "module", "has no submodule 'nowhere'"),
        ({**UPCAST_BLOCK, "module_class": "Linear"}, "module_class", "is a FluxSingleTransformerBlock here"),
    ],
)
def test_a_bad_fix_is_refused_naming_plan_fix_and_field_and_changes_nothing(
    saved_model, tmp_path, fix, field, message
):
    folder, _ = saved_model()
    path = _plan_file(tmp_path, [UPCAST_OTHER_BLOCK, fix])
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before = state_snapshot(pipe)
    with pytest.raises(ValueError, match=message) as raised:
        pipe.guard.apply_plan(path)
    assert str(raised.value).startswith(f"Precision plan {path} does not fit this pipeline: fix 1 ")
    assert f"{fix['strategy']} on {fix['module']}), `{field}`: " in str(raised.value)
    assert pipe.guard.fixes == []
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


def _plan_text(*fixes):
    return json.dumps({"format": FORMAT, "version": 1, "fixes": list(fixes)})


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (_plan_text(_clamp(1)).replace('"limit": 1', '"limit": 1e999'), "number '1e999' is out of range"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 16 levels"),
        (b'{"format": "\xff"}', r"not UTF-8 text \(byte 12\)"),
        (" " * (1 << 20) + "{}", "larger than the 1048576 bytes a plan may have"),
        (
            _plan_text(UPCAST_BLOCK, _upcast(output_absmax=None)),
            r"fix 1 \(transformer\.single_transformer_blocks\.0\), `module`: already fixed by fix 0",
        ),
        (_plan_text({**UPCAST_BLOCK, "params": []}), r"fix 0, `params`: must be an object"),
    ],
)
def test_an_unsafe_plan_file_is_refused_naming_the_file(saved_model, tmp_path, contents, message):
    path = tmp_path / "plan.json"
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    with pytest.raises(ValueError, match=message) as raised:
        GuardedFluxFillPipeline.from_pretrained(tmp_path / "not-loaded", guard_plan=path)
    assert str(path) in str(raised.value)

    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before = state_snapshot(pipe)
    with pytest.raises(ValueError, match=message):
        pipe.guard.apply_plan(str(path))
    assert state_snapshot(pipe) == before and pipe.guard.fixes == []


def test_a_plan_larger_than_the_pipeline_is_refused_before_any_entry_is_checked(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    entries = tuple(
        PlanEntry("clamp", f"transformer.m{index}", "Linear", {"limit": 1.0}) for index in range(50_000)
    )
    with pytest.raises(
        ValueError, match=r"Precision plan \(in memory\) .*50000 fixes for a pipeline of \d+ modules"
    ):
        pipe.guard.apply_plan(PrecisionPlan(entries))
    assert hook_count(pipe) == 0


def test_apply_plan_takes_a_path_and_applying_it_again_changes_nothing(saved_model, tmp_path):
    folder, _ = saved_model()
    path = _plan_file(tmp_path, [UPCAST_BLOCK, RESCALE, CLAMP])
    once = load(GuardedFluxFillPipeline, folder, torch.float16, guard_plan=path, guard_max_extra_memory=ROOMY)
    first = fill(once)
    fixes, state, hooks = list(once.guard.fixes), state_snapshot(once), hook_count(once)

    for again in (path, str(path), PrecisionPlan.load(path), once.guard.plan()):
        once.guard.apply_plan(again)
        assert once.guard.fixes == fixes
        assert state_snapshot(once) == state
        assert hook_count(once) == hooks
    second = fill(once)
    assert second.guard_report.incidents == []
    np.testing.assert_array_equal(second.images, first.images)

    assert [json.loads(json.dumps(entry.params)) for entry in once.guard.plan().entries] == [
        json.loads(json.dumps(fix["params"])) for fix in (UPCAST_BLOCK, RESCALE, CLAMP)
    ]
    with pytest.raises(
        ValueError, match=r"fix 0 \(upcast on .*\), `module`: the guard already holds another fix"
    ):
        once.guard.apply_plan(PrecisionPlan((PlanEntry(**_upcast(output_absmax=1.0)),)))
    once.guard.reset()
    assert hook_count(once) == 0


def test_a_uniform_shift_needs_no_consumer(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    uniform = [[channel, 2] for channel in range(128)]
    pipe.guard.apply_plan(
        PrecisionPlan((PlanEntry("rescale", PRODUCER, "Linear", {"producer_shifts": uniform}),))
    )
    assert [fix.strategy for fix in pipe.guard.fixes] == ["rescale"]


class HalfWay:
    """A third-party strategy (no ``validate``): its ``apply`` changes weights, dtypes, hooks, then raises."""

    name = "half-way"

    def recover(self, location):
        return None

    def apply(self, module_name, params, modules):
        module, other = modules(module_name), modules(params["also"])
        with torch.no_grad():
            module.weight.mul_(2)
            other.weight.mul_(2)
        other.bias.data = other.bias.data.float()
        module.register_forward_hook(lambda *_: None)
        module.weight = torch.nn.Parameter(module.weight.detach().clone())
        if params["error"] == "value":
            raise ValueError("half-way")
        if params["error"] == "runtime":
            raise RuntimeError("half-way")
        return "not a fix"


class HalfWayPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(HalfWay())


@pytest.fixture
def half_way():
    plugin = plugin_manager().register(HalfWayPlugin())
    yield
    plugin_manager().unregister(name=plugin)


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        (
            "value",
            ValueError,
            r"fix 1 \(half-way on .*proj_mlp\), `params`: apply raised ValueError: half-way",
        ),
        ("runtime", RuntimeError, "half-way"),
        ("none", ValueError, r"fix 1 \(half-way on .*proj_mlp\), `strategy`: apply returned str, not a Fix"),
    ],
)
def test_a_strategy_that_fails_half_way_is_rolled_back_exactly(saved_model, half_way, error, raised, message):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=ROOMY)
    before, parameter = state_snapshot(pipe), pipe.guard.module(PRODUCER).weight
    entry = PlanEntry("half-way", PRODUCER, "Linear", {"also": CONSUMER, "error": error})
    with pytest.raises(raised, match=message):
        pipe.guard.apply_plan(PrecisionPlan((PlanEntry(**UPCAST_OTHER_BLOCK), entry)))
    assert state_snapshot(pipe) == before
    assert pipe.guard.module(PRODUCER).weight is parameter
    assert hook_count(pipe) == 0 and pipe.guard.fixes == []
    assert fill(pipe).guard_report.incidents == []


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (lambda: PrecisionPlan(("upcast",)), r"fix 0: a str, not a PlanEntry"),
        (lambda: PrecisionPlan((PlanEntry(**_upcast(output_absmax=torch.ones(1))),)), "must hold plain JSON"),
        (
            lambda: PrecisionPlan((PlanEntry(**_upcast(output_absmax=_nested(10_000))),)),
            "nested deeper than 16",
        ),
        (
            lambda: PrecisionPlan.from_dict({"format": FORMAT, "fixes": _nested(10_000)}),
            "nested deeper than 16",
        ),
        (
            lambda: PrecisionPlan((PlanEntry(**UPCAST_BLOCK),) * 2),
            r"fix 1 .*`module`: already fixed by fix 0",
        ),
    ],
)
def test_a_bad_plan_in_memory_is_refused_before_loading(tmp_path, plan, message):
    with pytest.raises(ValueError, match=rf"Invalid precision plan \(in memory\): .*{message}"):
        GuardedFluxFillPipeline.from_pretrained(tmp_path / "not-loaded", guard_plan=plan())
