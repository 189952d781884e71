"""The bake's exact power-of-two rescale made at run time: the stream's writers scaled in float16.

A stream that overflows float16 is rescaled where it lies (traced once per component with the
bake's tracer): no float32 stream, no hook, no parameter memory. Where float16's precision next to
a massive activation is not enough (the cancelled sites), it measures beyond the tolerance and the
guard keeps the float32 stream of ``residual``; a stream that lasts to the output norm, or that
grows between modules where ``residual`` cannot act, is recovered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_finite, fill, load, state_snapshot
from diffusers import FluxFillPipeline
from PIL import Image

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError, PrecisionPlan, psnr, unguard
from guarded_diffusers.baking.calibrate import tracing
from guarded_diffusers.baking.cuts import CutFinder
from guarded_diffusers.baking.run import bake
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.core.casting import tensor_bytes
from guarded_diffusers.core.plan import PlanEntry
from guarded_diffusers.core.stream import residual_blocks
from guarded_diffusers.strategies import stream_cuts
from guarded_diffusers.strategies.exact_scaling import scale_exactly
from guarded_diffusers.testing import (
    LASTING_STREAM_SITES,
    RESIDUAL_SITES,
    inject_overflow,
    sample_inputs,
    tiny_flux_fill_pipeline,
)
from guarded_diffusers.testing.triggers import inject_mask_coverage_overflow

TOLERANCE = 2.0**-8
# Where residual declines: the stream overflows between modules (a gate times a writer's output),
# or a whole block's output saturates; no layer's output is out of range.
BETWEEN_MODULES = ("double_block_stream_growth", "single_block_stream_growth")
LASTING_SITE = "double_block_massive_channel"  # one massive channel, read by every later norm


def guarded(folder: Path, strategies: list[str] | None, **kwargs) -> GuardedFluxFillPipeline:
    return load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=strategies, **kwargs)


def parameter_bytes(pipe) -> int:
    return tensor_bytes(m for m in pipe.components.values() if isinstance(m, torch.nn.Module))


def transformer_hooks(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.transformer.modules())


def stream_dtypes(pipe) -> tuple[set[torch.dtype], int]:
    """The dtypes of every block's outputs in one call, and their largest size in bytes."""
    dtypes, sizes = set(), [0]

    def record(module, args, output):
        for tensor in output if isinstance(output, tuple) else (output,):
            dtypes.add(tensor.dtype)
            sizes[0] = max(sizes[0], tensor.numel() * tensor.element_size())

    handles = [block.register_forward_hook(record) for block in residual_blocks(pipe.transformer)]
    try:
        fill(pipe)
    finally:
        for handle in handles:
            handle.remove()
    return dtypes, sizes[0]


@pytest.mark.parametrize("site", sorted(LASTING_STREAM_SITES))
def test_a_lasting_stream_is_recovered_in_float16_with_no_float32_stream(saved_model, reference_images, site):
    folder, _ = saved_model(site)
    reference, bfloat16 = reference_images(site)
    pipe = guarded(folder, ["stream_rescale"])
    memory, hooks = parameter_bytes(pipe), transformer_hooks(pipe)

    output = fill(pipe)

    [incident] = output.guard_report.incidents
    assert incident.strategy == "stream_rescale" and incident.recovered and incident.error <= TOLERANCE
    assert incident.measured_module == "transformer"  # every writer of the stream changed: the component
    assert psnr(output.images, reference) >= psnr(bfloat16, reference) + 20.0
    assert parameter_bytes(pipe) == memory and output.guard_report.extra_bytes == 0
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float16}
    assert transformer_hooks(pipe) == hooks  # weights changed, no hook: nothing runs per step
    dtypes, _ = stream_dtypes(pipe)
    assert dtypes == {torch.float16}  # the stream stays float16

    carried = guarded(folder, ["residual"])
    if site in BETWEEN_MODULES:
        with pytest.raises(NonFiniteError, match="residual declined"):
            fill(carried)
    else:
        residual = fill(carried)
        assert residual.guard_report.recovered
        assert psnr(output.images, reference) >= psnr(residual.images, reference) - 1.0
        residual_dtypes, residual_bytes = stream_dtypes(carried)
        assert torch.float32 in residual_dtypes  # what residual pays: a float32 stream...
        assert residual_bytes == 2 * stream_dtypes(pipe)[1]  # ...twice the bytes of its largest block output


@pytest.mark.parametrize("site", sorted(RESIDUAL_SITES))
def test_next_to_a_cancelled_massive_channel_float16_precision_is_measured_and_residual_kept(
    saved_model, reference_images, site
):
    """Range alone is not enough there (docs/bake.md): the guard measures it and picks the float32 stream."""
    folder, injected = saved_model(site)
    reference, bfloat16 = reference_images(site)
    with pytest.warns(UserWarning, match="no fix came within tolerance"):
        alone = fill(guarded(folder, ["stream_rescale"]))
    first = alone.guard_report.incidents[0]
    assert (first.module, first.strategy, first.degraded) == (injected, "stream_rescale", True)
    assert TOLERANCE < first.error < 0.1
    rescaled = psnr(alone.images, reference)
    assert psnr(bfloat16, reference) + 5.0 <= rescaled

    default = fill(guarded(folder, None))
    first = default.guard_report.incidents[0]
    assert (first.strategy, first.recovered) == ("residual", True)
    assert [(a.strategy, a.outcome) for a in first.attempts][-2:] == [
        ("stream_rescale", "degraded"),
        ("residual", "applied"),
    ]
    assert psnr(default.images, reference) >= rescaled + 10.0


def test_the_default_order_rescales_where_it_measures_within_tolerance(saved_model):
    folder, injected = saved_model(LASTING_SITE)
    report = fill(guarded(folder, None)).guard_report
    assert [(i.module, i.strategy, i.recovered) for i in report.incidents] == [
        (injected, "stream_rescale", True)
    ]
    assert "recovered by stream_rescale on transformer.transformer_blocks.0.ff.net.2" in str(report)


def test_a_stream_read_by_gelu_is_declined_with_the_reason(saved_model):
    folder, _ = saved_model("double_block_ff")  # ff.net.0.proj feeds GELU: no normalisation in between
    with pytest.raises(NonFiniteError) as raised:
        fill(guarded(folder, ["stream_rescale"]))
    [attempt] = raised.value.report.incidents[0].attempts
    assert attempt.outcome == "declined" and "not scale-invariant: gelu" in attempt.detail


# -- exact and reversible ------------------------------------------------------------------------


def test_scaling_keeps_exactly_the_elements_it_cannot_hold_and_restores_their_bits():
    tensor = torch.tensor(
        [1.0, 3.0e-4, -(2.0**-14), 6.0e-8, 0.0, -0.0, 40000.0, float("nan")], dtype=torch.float16
    )
    before = tensor.clone()
    down = scale_exactly(tensor, -4)
    assert down.index.tolist() == [1, 3]  # 3e-4 and 6e-8 lose bits below 2**-14; the rest stay exact
    assert tensor[0].item() == 2.0**-4 and tensor[2].item() == -(2.0**-18)
    down.restore()
    assert torch.equal(tensor.view(torch.int16), before.view(torch.int16))
    up = scale_exactly(tensor, 2)  # 40000 * 4 passes 65504
    assert up.index.tolist() == [6] and torch.isinf(tensor[6])
    up.restore()
    assert torch.equal(tensor.view(torch.int16), before.view(torch.int16))


def test_reset_and_unguard_restore_every_weight_bit_for_bit(saved_model):
    folder, _ = saved_model(LASTING_SITE)
    pipe = guarded(folder, ["stream_rescale"])
    loaded = state_snapshot(pipe)
    fill(pipe)
    [fix] = pipe.guard.fixes
    assert fix.exponent == 4 and len(fix.changed_modules) == 8  # the embedders and each block's writers
    assert fix.inexact > 0 and fix.kept_bytes < 0.01 * parameter_bytes(pipe)  # float16 subnormals only
    assert state_snapshot(pipe) != loaded
    pipe.guard.reset()
    assert state_snapshot(pipe) == loaded
    fill(pipe)
    unguard(pipe)
    assert state_snapshot(pipe) == loaded


def test_a_plan_re_applies_the_same_bits_and_save_writes_the_weights_as_loaded(saved_model, tmp_path):
    folder, _ = saved_model(LASTING_SITE)
    pipe = guarded(folder, ["stream_rescale"])
    loaded = state_snapshot(pipe)
    first = fill(pipe)
    fixed = state_snapshot(pipe)
    plan = pipe.guard.plan().save(tmp_path / "plan.json")
    pipe.save_pretrained(tmp_path / "saved")
    assert state_snapshot(load(FluxFillPipeline, tmp_path / "saved", torch.float16)) == loaded
    assert state_snapshot(pipe) == fixed

    planned = guarded(folder, None, guard_plan=plan)
    assert state_snapshot(planned) == fixed
    second = fill(planned)
    assert second.guard_report.incidents == []
    np.testing.assert_array_equal(second.images, first.images)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"exponent": 0, "tensors": {"transformer.x_embedder.weight": 0}}, "integer `exponent`"),
        ({"exponent": 4, "tensors": {"transformer.x_embedder.weight": 3}}, "needs the exponent 4 or -4"),
        ({"exponent": 4, "tensors": {"transformer.x_embedder.scale": -4}}, "no floating tensor 'scale'"),
        ({"exponent": 4}, "missing parameter `'tensors'`"),
    ],
)
def test_a_plan_entry_that_does_not_fit_is_refused_naming_the_field(saved_model, params, message):
    folder, _ = saved_model()
    pipe = guarded(folder, None)
    loaded = state_snapshot(pipe)
    entry = PlanEntry("stream_rescale", "transformer.x_embedder", "Linear", params)
    with pytest.raises(ValueError, match=message):
        pipe.guard.apply_plan(PrecisionPlan((entry,)))
    assert state_snapshot(pipe) == loaded and pipe.guard.fixes == []


# -- the trace: once per component, anew when modules change -----------------------------------------


def test_a_float16_trace_full_of_inf_finds_the_float32_cuts(saved_model):
    folder, _ = saved_model(LASTING_SITE)
    found = {}
    for dtype in (torch.float32, torch.float16):
        pipe = load(FluxFillPipeline, folder, dtype)
        finder = CutFinder()
        with tracing({"transformer": pipe.transformer}, finder):
            fill(pipe, num_inference_steps=1)
        cuts, layers = finder.cuts()
        found[dtype] = ([(c.name, c.readers, c.writers, c.passers, c.pinned) for c in cuts], layers)
    assert found[torch.float16] == found[torch.float32]


@pytest.fixture
def traces(monkeypatch) -> list[str]:
    """The components ``stream_cuts`` traces from now on, by name."""
    traced: list[str] = []

    def counted(roots, finder):
        traced.extend(roots)
        return tracing(roots, finder)

    monkeypatch.setattr(stream_cuts, "tracing", counted)
    return traced


def test_the_trace_is_cached_per_component_and_redone_when_its_modules_change(
    saved_model, traces, caplog, diffusers_warnings
):
    folder, _ = saved_model("double_block_ff_residual")  # three incidents, each tries stream_rescale first
    incidents = fill(guarded(folder, None)).guard_report.incidents
    assert len(incidents) == 3 and all(
        "stream_rescale" in [a.strategy for a in i.attempts] for i in incidents
    )
    assert traces == ["transformer"]  # one trace for every incident of the call

    folder, _ = saved_model(LASTING_SITE)
    pipe = guarded(folder, ["stream_rescale"])
    fill(pipe)
    assert traces == ["transformer"] * 2  # another component object
    pipe.guard.reset()
    fill(pipe)
    assert traces == ["transformer"] * 2  # the same modules: the cached trace
    with diffusers_warnings():
        pipe.transformer.fuse_qkv_projections()
    assert pipe.guard.fixes == [] and "dropped the stream_rescale fix" in caplog.text  # weights changed
    fused = fill(pipe)
    assert [i.strategy for i in fused.guard_report.incidents] == ["stream_rescale"]
    assert traces == ["transformer"] * 3  # new Linears: traced again


# -- held across ordinary operations -------------------------------------------------------------


def test_casts_keep_the_fix_in_its_dtype_and_drop_it_in_another(saved_model):
    folder, _ = saved_model(LASTING_SITE)
    pipe = guarded(folder, ["stream_rescale"])
    fill(pipe)
    held = pipe.guard.in_force()
    pipe.to(torch.float16)
    assert pipe.guard.in_force() == held and fill(pipe).guard_report.incidents == []
    pipe.to(torch.float32)
    assert pipe.guard.fixes == []  # made and measured for float16
    assert fill(pipe).guard_report.incidents == []
    pipe.guard.reset()
    plain = load(FluxFillPipeline, folder, torch.float16)
    plain.to(torch.float16)  # casts T5's float32 ``wo``, in plain diffusers too
    plain.to(torch.float32)
    assert state_snapshot(pipe) == state_snapshot(plain)


def test_fusing_qkv_projections_with_the_fix_held_resets_to_the_plain_weights(saved_model):
    folder, _ = saved_model(LASTING_SITE)
    pipe = guarded(folder, ["stream_rescale"])
    reference = fill(load(FluxFillPipeline, folder, torch.float32)).images
    unfused = psnr(fill(pipe).images, reference)
    pipe.transformer.fuse_qkv_projections()
    fused = fill(pipe)
    assert fused.guard_report.recovered and psnr(fused.images, reference) >= unfused - 1.0
    pipe.transformer.unfuse_qkv_projections()
    assert all_finite(fill(pipe).images)
    pipe.guard.reset()
    control = load(FluxFillPipeline, folder, torch.float16)
    control.transformer.fuse_qkv_projections()
    control.transformer.unfuse_qkv_projections()
    assert state_snapshot(pipe) == state_snapshot(control)


# -- a baked folder --------------------------------------------------------------------------------

WHITE = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))
CONV1 = "encoder.down_blocks.0.resnets.0.conv1"


def _mask_with_hole(size: int) -> Image.Image:
    """A mask painting all but a ``size`` x ``size`` corner: the encoder's conv1 reads 1/sqrt(share)."""
    mask = np.full((32, 32), 255, np.uint8)
    mask[:size, :size] = 0
    return Image.fromarray(mask, mode="L")


@pytest.fixture(scope="module")
def baked(tmp_path_factory) -> tuple[Path, Path]:
    """(source, baked folder): a lasting transformer stream and a VAE cut that a near-full mask drives
    past float16, baked on one call with a quarter-painted white image (k=4 and k=1)."""
    root = tmp_path_factory.mktemp("baked-stream")
    pipe = tiny_flux_fill_pipeline(seed=0)
    inject_overflow(pipe, LASTING_SITE)
    inject_mask_coverage_overflow(pipe)
    pipe.save_pretrained(root / "src")
    call = {**sample_inputs(32), "image": WHITE, "num_inference_steps": 2, "max_sequence_length": 32}
    result = bake(pipe, [call])
    assert sorted(choice.k for choice in result.scaled) == [1, 4]
    write_baked(root / "src", root / "out", result)
    return root / "src", root / "out"


def test_a_baked_folders_guard_reports_its_scales(baked):
    _, out = baked
    pipe = guarded(out, None)
    exponents = pipe.guard.baked_exponents
    assert exponents["transformer"]["x_embedder.weight"] == -4 and exponents["vae"][f"{CONV1}.weight"] == -1
    report = fill(pipe).guard_report
    assert report.incidents == [] and report.baked == exponents  # the bake holds the massive channel
    assert "baked scales: vae: 2 tensors (2**-1); transformer: 16 tensors (2**-4)" in str(report)
    assert guarded(baked[0], None).guard.baked_exponents == {}


def test_an_unseen_input_past_the_bake_is_rescaled_on_top_of_it(baked):
    src, out = baked
    hole = {"image": WHITE, "mask_image": _mask_with_hole(3)}
    unbaked = fill(guarded(src, ["stream_rescale"]), **hole).guard_report.incidents
    pipe = guarded(out, ["stream_rescale"])

    report = fill(pipe, **hole).guard_report

    [incident] = report.incidents
    assert incident.module == f"vae.{CONV1}" and incident.recovered and incident.error <= TOLERANCE
    assert incident.absmax == unbaked[0].absmax / 2  # measured on the baked weights: 2**-1 already in
    [fix] = pipe.guard.fixes
    assert fix.exponent == 3 and fix.tensors[f"vae.{CONV1}.weight"] == -3  # the bake's 2**-1 times 2**-3
    original = load(FluxFillPipeline, src, torch.float16).vae.get_submodule(CONV1).weight.float()
    now = pipe.vae.get_submodule(CONV1).weight.float()
    normal = original.abs() >= 2.0**-10  # stays a normal float16 at 2**-4
    assert torch.equal(now[normal], original[normal] * 2.0**-4)
