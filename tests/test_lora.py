"""LoRA with fixes held: every adapter operation, in both orders, leaves reset, save and the next call right.

One tiny model overflows float16 at two sites: the double block's feed-forward (the guard keeps a
float32 island on ``ff``, a structural fix) and single block 0's ``proj_mlp`` (a rescale shift, whose
parameters depend on the weights). Two real tiny LoRAs are made with peft: "fox" on ``net.0.proj`` and
``to_q`` (inside the island), saved with ``save_lora_weights`` and loaded with ``load_lora_weights``;
"owl" on ``proj_mlp`` (the rescale's producer), added with ``transformer.add_adapter``.

Each operation runs after its prerequisites, (1) with both fixes held, and (2) on a pipeline
without fixes, before the guard detects the overflows. Either way: ``save_pretrained`` and ``reset``
do not raise, reset leaves every weight bit-identical to plain diffusers after the same operations,
and the next call is within 50 dB of float32 (plain bfloat16 is at 31-43 dB) or reports the incident.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fill, hook_count, load, state_snapshot
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.core.report import DegradedFixWarning
from guarded_diffusers.pipelines.operations import last_outcomes
from guarded_diffusers.testing import inject_overflow, tiny_flux_fill_pipeline

peft = pytest.importorskip("peft")

ISLAND = "transformer.transformer_blocks.0.ff"
SHIFTED = "transformer.single_transformer_blocks.0.proj_mlp"
FAITHFUL_DB = 50.0
STEPS = 1


# -- LoRA steps: each takes the pipeline and the folder holding "fox" -----------------------------


def _owl_config() -> Any:
    return peft.LoraConfig(r=4, lora_alpha=4, target_modules=["proj_mlp"], init_lora_weights=False)


def add_owl(pipe: FluxFillPipeline, _: Path) -> None:
    torch.manual_seed(7)  # the same random adapter in every pipeline, whatever its dtype
    pipe.transformer.add_adapter(_owl_config(), adapter_name="owl")


def load_fox(pipe: FluxFillPipeline, folder: Path) -> None:
    pipe.load_lora_weights(folder, adapter_name="fox")


STEPS_BY_NAME: dict[str, Callable[[FluxFillPipeline, Path], None]] = {
    "load_lora_weights": load_fox,
    "add_adapter": add_owl,
    "set_adapters": lambda pipe, _: pipe.set_adapters(["fox"], [0.5]),
    "disable_lora": lambda pipe, _: pipe.disable_lora(),
    "enable_lora": lambda pipe, _: pipe.enable_lora(),
    "delete_adapters": lambda pipe, _: pipe.delete_adapters("fox"),
    "unload_lora_weights": lambda pipe, _: pipe.unload_lora_weights(),
    "fuse_lora": lambda pipe, _: pipe.fuse_lora(),
    "unfuse_lora": lambda pipe, _: pipe.unfuse_lora(),
}
# operation -> (prerequisite steps, where the island and the shift are after it with both held; None: dropped)
OPERATIONS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "load_lora_weights": ((), ISLAND, SHIFTED),
    "add_adapter": ((), ISLAND, None),  # proj_mlp became a LoRA layer: the adapter's delta is not shifted
    "set_adapters": (("load_lora_weights",), ISLAND, SHIFTED),
    "disable_lora": (("load_lora_weights",), ISLAND, SHIFTED),
    "enable_lora": (("load_lora_weights", "disable_lora"), ISLAND, SHIFTED),
    "delete_adapters": (("load_lora_weights",), ISLAND, SHIFTED),
    "unload_lora_weights": (("load_lora_weights",), ISLAND, SHIFTED),
    "fuse_lora": (("load_lora_weights",), ISLAND, None),  # weights changed: the shift is measured anew
    "unfuse_lora": (("load_lora_weights", "fuse_lora"), ISLAND, None),
}


def run_steps(pipe: FluxFillPipeline, steps: tuple[str, ...], lora: Path) -> FluxFillPipeline:
    for step in steps:
        STEPS_BY_NAME[step](pipe, lora)
    return pipe


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models run fastest on one thread, and a busy machine does not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model overflowing float16 in the double block's ff (upcast) and in proj_mlp (rescale)."""
    folder = tmp_path_factory.mktemp("tiny-lora-sites")
    pipe = tiny_flux_fill_pipeline()
    inject_overflow(pipe, "double_block_ff")
    inject_overflow(pipe, "single_block_mlp")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Path:
    """The "fox" LoRA (net.0.proj, to_q; random A and B), saved the way diffusers saves LoRAs."""
    folder = tmp_path_factory.mktemp("lora-fox")
    pipe = load(FluxFillPipeline, model, torch.float32)
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["net.0.proj", "to_q"], init_lora_weights=False
    )
    pipe.transformer.add_adapter(config, adapter_name="fox")
    state = peft.utils.get_peft_model_state_dict(pipe.transformer, adapter_name="fox")
    FluxFillPipeline.save_lora_weights(folder, transformer_lora_layers=state)
    return folder


@pytest.fixture(scope="module")
def plan(model: Path) -> Any:
    """The guard's own fixes for the model: an island on the double block's ff, a shift on proj_mlp."""
    pipe = load(GuardedFluxFillPipeline, model, torch.float16)
    fill(pipe, num_inference_steps=STEPS)
    held = pipe.guard.plan()
    assert [(entry.strategy, entry.module) for entry in held.entries] == [
        ("upcast", ISLAND),
        ("rescale", SHIFTED),
    ]
    return held


@pytest.fixture(scope="module")
def plain(model: Path, lora: Path) -> Callable[[tuple[str, ...]], tuple[np.ndarray, dict, int]]:
    """``plain(steps)`` -> plain diffusers after ``steps``: float32 images, float16 weights and hook count."""
    cache: dict[tuple[str, ...], tuple[np.ndarray, dict, int]] = {}

    def get(steps: tuple[str, ...]) -> tuple[np.ndarray, dict, int]:
        if steps not in cache:
            reference = run_steps(load(FluxFillPipeline, model, torch.float32), steps, lora)
            control = run_steps(load(FluxFillPipeline, model, torch.float16), steps, lora)
            images = fill(reference, num_inference_steps=STEPS).images
            cache[steps] = (images, state_snapshot(control), hook_count(control))
        return cache[steps]

    return get


def check_call(
    pipe: GuardedFluxFillPipeline, reference: np.ndarray, must_report: tuple[str, ...] = ()
) -> Any:
    """One call: finite, faithful to float32 or reported as degraded; ``must_report`` modules in incidents."""
    output = fill(pipe, num_inference_steps=STEPS)
    report = output.guard_report
    assert np.isfinite(output.images).all()
    assert psnr(output.images, reference) >= FAITHFUL_DB or report.degraded, str(report)
    located = " ".join(f"{incident.module} {incident.fixed_module}" for incident in report.incidents)
    assert all(module in located for module in must_report), str(report)
    return report


def check_save_and_reset(pipe: GuardedFluxFillPipeline, tmp_path: Path, control: tuple[dict, int]) -> None:
    """save_pretrained keeps the fixes; reset leaves plain diffusers' weights bit for bit, and no hook."""
    held = pipe.guard.plan()
    pipe.save_pretrained(tmp_path / "saved")
    assert pipe.guard.plan() == held
    pipe.guard.reset()
    assert not pipe.guard.fixes
    assert state_snapshot(pipe) == control[0]
    assert hook_count(pipe) == control[1]


# -- both orders, every operation ----------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS)
def test_fix_held_then_lora_operation(operation, model, lora, plan, plain, tmp_path):
    prerequisites, island, shifted = OPERATIONS[operation]
    steps = (*prerequisites, operation)
    pipe = run_steps(load(GuardedFluxFillPipeline, model, torch.float16), prerequisites, lora)
    pipe.guard.apply_plan(plan)

    STEPS_BY_NAME[operation](pipe, lora)

    assert [(o.strategy, o.module) for o in last_outcomes(pipe.guard)] == [
        ("upcast", island),
        ("rescale", shifted),
    ]
    assert [(fix.strategy, fix.module_name) for fix in pipe.guard.fixes] == [
        (strategy, module) for strategy, module in (("upcast", island), ("rescale", shifted)) if module
    ]
    reference, *control = plain(steps)
    # A dropped shift is found again on the next call, and reported.
    check_call(pipe, reference, must_report=() if shifted else (SHIFTED,))
    check_save_and_reset(pipe, tmp_path, control)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_lora_operation_then_fix(operation, model, lora, plain, tmp_path):
    prerequisites, _, _ = OPERATIONS[operation]
    steps = (*prerequisites, operation)
    pipe = run_steps(load(GuardedFluxFillPipeline, model, torch.float16), steps, lora)
    reference, *control = plain(steps)

    report = check_call(pipe, reference, must_report=(ISLAND, SHIFTED))
    assert report.fixes and pipe.guard.fixes
    check_save_and_reset(pipe, tmp_path, control)


# -- the reported failures -----------------------------------------------------------------------


def test_adapter_added_and_unloaded_around_an_island(saved_model, lora, tmp_path):
    """Was: KeyError 'weight' / AttributeError 'base_layer' from reset and save, then dtype mismatches."""
    folder, _ = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=0.1)
    control = load(FluxFillPipeline, folder, torch.float16)
    reference = load(FluxFillPipeline, folder, torch.float32)
    for step in ("add_adapter", "load_lora_weights", "unload_lora_weights"):
        report = fill(pipe, num_inference_steps=STEPS).guard_report  # an island is held when the step runs
        assert [fix.strategy for fix in report.fixes] == ["upcast"]
        for each in (pipe, control, reference):
            STEPS_BY_NAME[step](each, lora)
        assert [fix.module_name for fix in pipe.guard.fixes] == ["transformer.single_transformer_blocks.0"]
        images = fill(reference, num_inference_steps=STEPS).images
        check_call(pipe, images)
        check_save_and_reset(pipe, tmp_path / step, (state_snapshot(control), hook_count(control)))


def test_fuse_after_a_shift_then_reset_reports_the_overflow_again(saved_model, lora, tmp_path):
    """Was: fuse_lora() after a rescale fix, then reset: 'no incidents' at 25.7 dB (control 67.1)."""
    folder, module = saved_model("single_block_mlp")
    pipe, control, reference = (
        run_steps(load(cls, folder, dtype), ("add_adapter",), lora)
        for cls, dtype in (
            (GuardedFluxFillPipeline, torch.float16),
            (FluxFillPipeline, torch.float16),
            (FluxFillPipeline, torch.float32),
        )
    )
    report = fill(pipe, num_inference_steps=STEPS).guard_report
    assert [(fix.strategy, fix.module) for fix in report.fixes] == [("rescale", f"{module}.base_layer")]
    for each in (pipe, control, reference):
        each.fuse_lora()
    assert not pipe.guard.fixes  # the shift was measured on the weights before the fuse
    pipe.guard.reset()
    assert state_snapshot(pipe) == state_snapshot(control)
    report = check_call(pipe, fill(reference, num_inference_steps=STEPS).images, must_report=(module,))
    assert report.incidents and all(incident.recovered for incident in report.incidents)


@pytest.mark.filterwarnings("ignore::guarded_diffusers.core.report.DegradedFixWarning")  # proj_out
def test_a_hook_fix_follows_its_layer_into_and_out_of_a_lora_layer(saved_model, tmp_path):
    """residual hooks plain Linears: on a LoRA layer it moves to ``base_layer``, stays through a fuse (it
    holds no weight), and goes back to the plain layer after unloading."""
    folder, _ = saved_model("double_block_ff_residual")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=["residual"])
    control = load(FluxFillPipeline, folder, torch.float16)
    reference = load(FluxFillPipeline, folder, torch.float32)
    report = fill(pipe, num_inference_steps=STEPS).guard_report
    tolerance = pipe.guard.options.tolerance
    held = [
        (fix.strategy, fix.module) for fix in report.fixes if fix.error is not None and fix.error <= tolerance
    ]
    feed_forward = [module for _, module in held if module.endswith(".net.2")]
    assert len(feed_forward) == 2  # ff and ff_context, each within tolerance
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["net.2"], init_lora_weights=False)
    for each in (pipe, control, reference):
        torch.manual_seed(7)
        each.transformer.add_adapter(config, adapter_name="owl")
    assert [(fix.strategy, fix.module_name) for fix in pipe.guard.fixes] == [
        (strategy, f"{module}.base_layer" if module in feed_forward else module) for strategy, module in held
    ]
    moved = [(strategy, f"{module}.base_layer") for strategy, module in held if module in feed_forward]
    for fuse in (False, True):
        if fuse:
            for each in (pipe, control, reference):
                each.fuse_lora()
        assert [(f.strategy, f.module_name) for f in pipe.guard.fixes if ".net.2" in f.module_name] == moved
        report = check_call(pipe, fill(reference, num_inference_steps=STEPS).images)
        assert not [incident for incident in report.incidents if ".net.2" in (incident.module or "")]
    for each in (pipe, control):
        each.unfuse_lora()
        each.unload_lora_weights()
    assert {module for _, module in held} <= {fix.module_name for fix in pipe.guard.fixes}
    check_save_and_reset(pipe, tmp_path, (state_snapshot(control), hook_count(control)))


@pytest.mark.parametrize("steps", [("add_adapter",), ("load_lora_weights", "fuse_lora")])
def test_a_degraded_fix_is_not_carried_across_an_operation(steps, saved_model, lora, tmp_path):
    """A clamp measured far from float32 is dropped: the next call clamps again and reports it degraded."""
    folder, module = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=["clamp"])
    control = load(FluxFillPipeline, folder, torch.float16)
    reference = load(FluxFillPipeline, folder, torch.float32)
    for step in steps:
        with pytest.warns(DegradedFixWarning):
            assert fill(pipe, num_inference_steps=STEPS).guard_report.degraded
        for each in (pipe, control, reference):
            STEPS_BY_NAME[step](each, lora)
        assert not pipe.guard.fixes
    with pytest.warns(DegradedFixWarning):
        report = check_call(pipe, fill(reference, num_inference_steps=STEPS).images, must_report=(module,))
    assert report.degraded
    check_save_and_reset(pipe, tmp_path, (state_snapshot(control), hook_count(control)))


# -- how operations are watched -----------------------------------------------------------------


def test_a_dropped_fix_is_logged_with_the_operation_and_the_reason(
    model, lora, plan, diffusers_warnings, caplog
):
    pipe = load(GuardedFluxFillPipeline, model, torch.float16, guard_plan=plan)
    with diffusers_warnings():
        add_owl(pipe, lora)
    dropped = {record.getMessage() for record in caplog.records if "dropped" in record.getMessage()}
    assert len(dropped) == 1
    [dropped] = dropped
    assert "add_adapter" in dropped and f"rescale fix on {SHIFTED}" in dropped
    assert "LoRA layer" in dropped


def test_an_operation_that_raises_keeps_the_fixes(model, plan):
    pipe = load(GuardedFluxFillPipeline, model, torch.float16, guard_plan=plan)
    with pytest.raises(ValueError):
        pipe.set_adapters("no-such-adapter")
    assert pipe.guard.plan() == plan


def test_a_plain_pipeline_sharing_the_transformer_lifts_the_guards_fixes(model, lora, plan, tmp_path):
    pipe = load(GuardedFluxFillPipeline, model, torch.float16, guard_plan=plan)
    shared = FluxFillPipeline(**pipe.components)
    control = load(FluxFillPipeline, model, torch.float16)
    for each in (shared, control):
        run_steps(each, ("load_lora_weights", "fuse_lora"), lora)
    assert [fix.module_name for fix in pipe.guard.fixes] == [ISLAND]
    check_save_and_reset(pipe, tmp_path, (state_snapshot(control), hook_count(control)))


def test_wrapped_methods_keep_their_signatures_and_copies_stay_plain(model, plan):
    pipe = load(GuardedFluxFillPipeline, model, torch.float16, guard_plan=plan)
    transformer = pipe.transformer
    for name in ("add_adapter", "fuse_lora", "unload_lora", "load_lora_adapter"):
        method = getattr(transformer, name)
        assert method.__self__ is transformer
        assert inspect.signature(method) == inspect.signature(
            getattr(type(transformer), name).__get__(transformer)
        )
    for name in ("load_lora_weights", "fuse_lora", "unload_lora_weights"):
        assert inspect.signature(getattr(GuardedFluxFillPipeline, name)) == inspect.signature(
            getattr(FluxFillPipeline, name)
        )
    clone = copy.deepcopy(transformer)
    assert clone.add_adapter.__self__ is clone
    torch.manual_seed(7)
    clone.add_adapter(_owl_config(), adapter_name="owl")
    assert [fix.strategy for fix in pipe.guard.fixes] == ["upcast", "rescale"]  # the copy lifts nothing
