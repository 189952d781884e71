"""GuardedFluxFillPipeline recovers every injected float16 overflow, faithfully and reversibly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import all_finite, count_calls, fill, hook_count, load, state_snapshot
from diffusers import DiffusionPipeline, FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline, GuardedFluxPipelineOutput, NonFiniteError
from guarded_diffusers.core.casting import Float32Island
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.core.measure import encloses
from guarded_diffusers.strategies.upcast import UpcastFix
from guarded_diffusers.testing import INJECTION_SITES, inject_overflow, tiny_flux_fill_pipeline


@pytest.mark.parametrize("site", INJECTION_SITES)
def test_each_site_is_recovered_closer_to_float32_than_bfloat16(saved_model, site):
    folder, overflowing = saved_model(site)
    reference = fill(load(FluxFillPipeline, folder, torch.float32)).images
    bfloat16 = fill(load(FluxFillPipeline, folder, torch.bfloat16)).images
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)

    output = fill(pipe)

    assert isinstance(output, GuardedFluxPipelineOutput)
    assert all_finite(output.images)
    assert psnr(output.images, reference) > psnr(bfloat16, reference) + 10.0
    [incident] = output.guard_report.incidents
    assert incident.module == overflowing
    # upcast where its float32 island fits the default 5 % memory budget, rescale where it does not
    assert incident.recovered and incident.strategy in ("upcast", "rescale")
    assert incident.error <= 2**-8 and encloses(incident.measured_module, incident.fixed_module)
    assert encloses(incident.fixed_module, overflowing)
    assert incident.absmax > torch.finfo(torch.float16).max


def test_denoise_incident_names_its_step_and_other_stages_none(saved_model):
    transformer_folder, _ = saved_model("single_block_mlp")
    vae_folder, _ = saved_model("vae_decoder")
    [denoise] = fill(load(GuardedFluxFillPipeline, transformer_folder, torch.float16)).guard_report.incidents
    [decode] = fill(load(GuardedFluxFillPipeline, vae_folder, torch.float16)).guard_report.incidents
    assert (denoise.stage, denoise.step) == ("denoise", 0)
    assert (decode.stage, decode.step) == ("vae_decode", None)


def test_upcast_keeps_everything_outside_the_fixed_region_in_float16(saved_model):
    folder, _ = saved_model("double_block_ff")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    [incident] = fill(pipe).guard_report.incidents
    region = incident.fixed_module.removeprefix("transformer.")
    for name, parameter in pipe.transformer.named_parameters():
        expected = torch.float32 if name.startswith(region + ".") else torch.float16
        assert parameter.dtype == expected, name
    for component in (pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in component.parameters()} == {torch.float16}


def test_fix_is_kept_for_later_steps_and_calls_and_costs_at_most_two_forwards(saved_model):
    folder, _ = saved_model("single_block_mlp")
    plain = load(FluxFillPipeline, folder, torch.float16)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    plain_calls, guarded_calls = count_calls(plain.transformer), count_calls(pipe.transformer)
    fill(plain)
    first = fill(pipe)
    assert len(first.guard_report.incidents) == 1
    assert guarded_calls[0] - plain_calls[0] <= 2

    calls_before_second = guarded_calls[0]
    second = fill(pipe)
    assert second.guard_report.incidents == []
    assert guarded_calls[0] - calls_before_second == plain_calls[0]
    np.testing.assert_array_equal(second.images, first.images)


def test_clean_model_output_is_bit_identical_to_diffusers_with_the_same_forwards(saved_model):
    folder, _ = saved_model()
    plain = load(FluxFillPipeline, folder, torch.float16)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    plain_calls, guarded_calls = count_calls(plain.transformer), count_calls(pipe.transformer)
    hooks_before = hook_count(pipe)

    expected, output = fill(plain), fill(pipe)

    np.testing.assert_array_equal(output.images, expected.images)
    assert guarded_calls[0] == plain_calls[0]
    assert output.guard_report.incidents == []
    assert hook_count(pipe) == hooks_before


def test_reset_restores_every_weight_and_dtype_bit_for_bit(saved_model):
    folder, _ = saved_model("t5_ff")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before = state_snapshot(pipe)
    assert pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32

    fill(pipe)
    assert pipe.guard.fixes and state_snapshot(pipe) != before

    pipe.guard.reset()
    assert pipe.guard.fixes == []
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0
    assert len(fill(pipe).guard_report.incidents) == 1


@pytest.mark.parametrize("interruption", [RuntimeError("user callback failed"), KeyboardInterrupt()])
def test_exception_mid_run_rolls_back_that_calls_fixes_and_leaves_no_hooks(saved_model, interruption):
    folder, _ = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    before = state_snapshot(pipe)

    def interrupt(pipeline, step, timestep, tensors):
        if step == 1:
            raise interruption
        return {}

    with pytest.raises(type(interruption)):
        fill(pipe, callback_on_step_end=interrupt)

    assert pipe.guard.fixes == []
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


def test_earlier_calls_fixes_survive_a_later_failed_call(saved_model):
    folder, _ = saved_model("clip_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    fill(pipe)
    kept = state_snapshot(pipe)

    def fail(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fill(pipe, callback_on_step_end=fail)
    assert len(pipe.guard.fixes) == 1
    assert state_snapshot(pipe) == kept


def test_unrecoverable_nan_raises_with_the_report_and_restores_the_model(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] = float("nan")
    before = state_snapshot(pipe)

    with pytest.raises(NonFiniteError, match="Could not recover denoise") as raised:
        fill(pipe)

    incidents = raised.value.report.incidents
    assert incidents[0].module == "transformer.proj_out"
    assert json.loads(raised.value.report.to_json())["incidents"][0]["absmax"] == "nan"
    assert not any(incident.recovered for incident in incidents)
    assert pipe.guard.fixes == [] and state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


def test_non_finite_latents_from_the_scheduler_raise(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    original_step = pipe.scheduler.step

    def overflowing_step(*args, **kwargs):
        (latents,) = original_step(
            *args, return_dict=False, **{k: v for k, v in kwargs.items() if k != "return_dict"}
        )
        return (latents * float("inf"),)

    pipe.scheduler.step = overflowing_step
    with pytest.raises(NonFiniteError, match="scheduler produced non-finite latents at step 0") as raised:
        fill(pipe)
    [incident] = raised.value.report.incidents
    assert (incident.stage, incident.module, incident.recovered) == ("scheduler_step", "scheduler", False)


def test_report_is_json_serialisable_and_logged_through_diffusers(saved_model, caplog, diffusers_warnings):
    folder, overflowing = saved_model("vae_encoder")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    with diffusers_warnings():
        report = fill(pipe).guard_report
    [incident] = json.loads(report.to_json())["incidents"]
    assert incident["module"] == overflowing
    assert set(incident) >= {"stage", "step", "module", "absmax", "strategy", "recovered"}
    assert any(
        record.name.startswith("diffusers.") and overflowing in record.getMessage()
        for record in caplog.records
    )


def test_from_pipe_converts_an_existing_pipeline_and_recovers(saved_model):
    folder, overflowing = saved_model("double_block_ff_context")
    plain = load(FluxFillPipeline, folder, torch.float16)
    pipe = GuardedFluxFillPipeline.from_pipe(plain)
    assert pipe.transformer is plain.transformer
    assert pipe.transformer.dtype == torch.float16
    output = fill(pipe)
    assert all_finite(output.images)
    assert output.guard_report.incidents[0].module == overflowing


def test_from_pretrained_takes_dtype_and_variant(saved_model, tmp_path):
    folder, _ = saved_model("vae_decoder")
    load(FluxFillPipeline, folder, torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert list(tmp_path.glob("transformer/*.fp16.safetensors"))
    pipe = GuardedFluxFillPipeline.from_pretrained(tmp_path, dtype=torch.float16, variant="fp16")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.dtype == torch.float16
    assert all_finite(fill(pipe).images)


def test_a_saved_guarded_pipeline_loads_with_plain_diffusers(saved_model, tmp_path):
    folder, _ = saved_model()
    load(GuardedFluxFillPipeline, folder, torch.float16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is FluxFillPipeline


def test_return_dict_false_returns_the_plain_tuple(saved_model):
    folder, _ = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    output = fill(pipe, return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1
    assert all_finite(output[0])
    assert len(pipe.guard.last_report.incidents) == 1


def test_user_callback_runs_with_the_tensors_it_asked_for(saved_model):
    folder, _ = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"prompt_embeds": tensors["prompt_embeds"]}

    output = fill(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert all_finite(output.images)
    assert seen == [(0, ["prompt_embeds"]), (1, ["prompt_embeds"]), (2, ["prompt_embeds"])]


def test_model_cpu_offload_still_works(saved_model):
    folder, overflowing = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    pipe.enable_model_cpu_offload(device="cpu")
    output = fill(pipe)
    assert all_finite(output.images)
    assert output.guard_report.incidents[0].module == overflowing
    assert all_finite(fill(pipe).images)


class UpcastWholeComponent:
    """A user strategy through the public interface: upcast the entire component."""

    name = "whole-component"

    def recover(self, location):
        component = location.calls[-1]
        return UpcastFix(component.name, Float32Island(component.module), None, strategy=self.name)


@pytest.mark.parametrize(("site", "component"), [("clip_mlp", "text_encoder"), ("t5_ff", "text_encoder_2")])
def test_whole_text_encoder_upcast_keeps_prompt_embeddings_in_the_working_dtype(saved_model, site, component):
    folder, _ = saved_model(site)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=1.0)
    pipe.guard.strategies = [UpcastWholeComponent()]

    output = fill(pipe)

    assert all_finite(output.images)
    [incident] = output.guard_report.incidents
    assert (incident.strategy, incident.fixed_module) == ("whole-component", component)
    assert getattr(pipe, component).dtype == torch.float32
    assert {tensor.dtype for tensor in pipe.encode_prompt("a fox", None, max_sequence_length=32)} == {
        torch.float16
    }


def test_two_overflows_in_one_component_are_two_incidents_in_one_step(tmp_path):
    pipe = tiny_flux_fill_pipeline()
    first = inject_overflow(pipe, "double_block_ff")
    second = inject_overflow(pipe, "single_block_mlp", block=1)
    pipe.save_pretrained(tmp_path)
    guarded = load(GuardedFluxFillPipeline, tmp_path, torch.float16)

    output = fill(guarded)

    assert all_finite(output.images)
    incidents = output.guard_report.incidents
    assert [(incident.module, incident.step, incident.recovered) for incident in incidents] == [
        (first, 0, True),
        (second, 0, True),
    ]


def test_guidance_above_float16_range_overflows_in_the_transformers_own_forward(saved_model):
    folder, _ = saved_model()
    plain = load(FluxFillPipeline, folder, torch.float16)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    reference = fill(load(FluxFillPipeline, folder, torch.float32), guidance_scale=66.0).images

    assert not all_finite(fill(plain, guidance_scale=66.0).images)  # 66 x 1000 > 65504
    output = fill(pipe, guidance_scale=66.0)

    assert psnr(output.images, reference) > 60.0
    [incident] = output.guard_report.incidents
    assert incident.module == "transformer.time_text_embed.time_proj"
    assert (incident.strategy, incident.fixed_module) == ("guidance", "transformer.time_text_embed")
    assert incident.recovered and incident.extra_bytes == 0
