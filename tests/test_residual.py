"""Massive activations in the residual stream: clipped or NaN in float16, seen and carried in float32."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from conftest import STEPS, all_finite, count_calls, fill, hook_count, load, state_snapshot
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.core.casting import tensor_bytes
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.core.measure import encloses
from guarded_diffusers.core.stream import residual_blocks
from guarded_diffusers.testing import (
    RESIDUAL_SITES,
    SILENTLY_CLIPPED_SITES,
    inject_overflow,
    tiny_flux_fill_pipeline,
)


def parameter_bytes(pipe) -> int:
    return tensor_bytes(module for module in pipe.components.values() if isinstance(module, torch.nn.Module))


def quietly(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain float16's NaN cast, a degraded cancelling block
        return call()


@pytest.mark.parametrize("site", sorted(RESIDUAL_SITES))
def test_each_residual_site_is_reported_and_carried_in_float32_at_no_memory_cost(saved_model, site):
    folder, injected = saved_model(site)
    reference = fill(load(FluxFillPipeline, folder, torch.float32)).images
    bfloat16 = fill(load(FluxFillPipeline, folder, torch.bfloat16)).images
    plain = quietly(lambda: fill(load(FluxFillPipeline, folder, torch.float16)).images)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    memory = parameter_bytes(pipe)

    output = quietly(lambda: fill(pipe))

    assert all_finite(output.images)
    assert all_finite(plain) == (site in SILENTLY_CLIPPED_SITES)  # finite and silently wrong, or black
    assert psnr(output.images, reference) >= psnr(bfloat16, reference) + 20.0
    first = output.guard_report.incidents[0]
    assert (first.module, first.strategy, first.recovered) == (injected, "residual", True)
    # measured on the layer's caller (its output matters through what consumes it), float32 stream included
    assert (
        first.error <= 2**-8
        and encloses(first.measured_module, injected)
        and first.measured_module != injected
    )
    assert parameter_bytes(pipe) == memory and output.guard_report.extra_bytes == 0
    assert all(fix.module_name != "transformer" for fix in pipe.guard.fixes)  # no whole-component island
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float16}


def test_a_clipped_site_whose_stream_fits_is_fixed_where_the_plain_pipeline_says_nothing(saved_model):
    folder, injected = saved_model("single_block_proj_out")
    plain = load(FluxFillPipeline, folder, torch.float16)
    block = plain.transformer.single_transformer_blocks[0]
    peaks = []
    block.register_forward_hook(lambda module, args, out: peaks.append(out[1].abs().max().item()))

    images = fill(plain).images

    assert all_finite(images)  # diffusers clipped the inf to 65504: nothing looks wrong
    assert max(peaks) == torch.finfo(torch.float16).max
    [first, *_] = fill(load(GuardedFluxFillPipeline, folder, torch.float16)).guard_report.incidents
    assert first.module == injected and first.absmax > torch.finfo(torch.float16).max


def _saturating_pipeline(tmp_path):
    """single_block_proj_out, scaled so proj_out reaches ~64800: finite in float16, in the clip band."""
    pipe = tiny_flux_fill_pipeline()
    inject_overflow(pipe, "single_block_proj_out")
    gate_row = 2 * pipe.transformer.inner_dim  # AdaLayerNormZeroSingle: shift, scale, gate
    with torch.no_grad():
        for block in pipe.transformer.single_transformer_blocks:  # the injected one and its cancel
            block.proj_out.weight[0] *= 64800.0 / 120000.0
            block.norm.linear.bias[gate_row] = 1.0
    pipe.save_pretrained(tmp_path)
    return tmp_path


def test_a_finite_value_in_the_clip_band_is_a_saturated_incident(tmp_path):
    folder = _saturating_pipeline(tmp_path)
    plain = load(FluxFillPipeline, folder, torch.float16)
    outputs = []
    plain.transformer.single_transformer_blocks[0].proj_out.register_forward_hook(
        lambda module, args, out: outputs.append(out)
    )
    assert all_finite(fill(plain).images)
    peak = max(float(out.abs().max()) for out in outputs)
    assert torch.finfo(torch.float16).max - 1000 <= peak < torch.finfo(torch.float16).max  # never inf

    report = quietly(lambda: fill(load(GuardedFluxFillPipeline, folder, torch.float16))).guard_report

    first = report.incidents[0]
    assert (first.kind, first.module) == ("saturated", "transformer.single_transformer_blocks.0.proj_out")
    assert first.strategy == "residual" and first.recovered
    assert "saturated (clipped at the dtype's maximum) output" in str(report)


def test_blocks_are_the_repeated_items_of_each_component(saved_model):
    folder, _ = saved_model()
    pipe = load(FluxFillPipeline, folder, torch.float16)
    transformer = pipe.transformer
    assert residual_blocks(transformer) == [
        *transformer.transformer_blocks,
        *transformer.single_transformer_blocks,
    ]
    assert residual_blocks(pipe.text_encoder_2) == list(pipe.text_encoder_2.encoder.block)
    assert residual_blocks(pipe.text_encoder) == list(pipe.text_encoder.encoder.layers)


def test_reset_save_and_plan_round_trip_with_a_residual_fix(saved_model, tmp_path):
    folder, _ = saved_model("double_block_ff_residual")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before, hooks = state_snapshot(pipe), hook_count(pipe)
    first = quietly(lambda: fill(pipe))
    assert "residual" in {fix.strategy for fix in pipe.guard.fixes}
    plan = pipe.guard.plan().save(tmp_path / "plan.json")

    pipe.save_pretrained(tmp_path / "saved")
    saved = load(FluxFillPipeline, tmp_path / "saved", torch.float16)
    assert state_snapshot(saved) == before  # the weights as loaded, not the fix's hooks
    pipe.guard.reset()
    assert state_snapshot(pipe) == before and hook_count(pipe) == hooks

    planned = load(GuardedFluxFillPipeline, folder, torch.float16, guard_plan=plan)
    second = quietly(lambda: fill(planned))
    assert second.guard_report.incidents == []
    np.testing.assert_array_equal(second.images, first.images)


@contextlib.contextmanager
def counting_host_reads():
    """Counts ``Tensor.item`` and ``Tensor.tolist``: every read of a device value on the host."""
    counts = [0]
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist")}

    def counted(original):
        def read(self, *args, **kwargs):
            counts[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_block_watch_adds_no_host_read_on_the_happy_path(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    plain = load(FluxFillPipeline, folder, torch.float16)
    calls = {
        name: count_calls(module)
        for name, module in [
            ("clip", pipe.text_encoder),
            ("t5", pipe.text_encoder_2),
            ("encode", pipe.vae.encoder),
            ("denoise", pipe.transformer),
            ("decode", pipe.vae.decoder),
        ]
    }
    with counting_host_reads() as plain_reads:
        expected = fill(plain).images
    with counting_host_reads() as guarded_reads:
        output = fill(pipe)

    np.testing.assert_array_equal(output.images, expected)
    component_calls = sum(count[0] for count in calls.values())
    assert guarded_reads[0] - plain_reads[0] == component_calls + STEPS  # one per component call and step
