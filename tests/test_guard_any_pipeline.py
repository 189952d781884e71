"""guard(pipe) on every family: the same instance, located and faithful recoveries, exact unguard."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import state_snapshot
from diffusers import (
    DiffusionPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    StableDiffusionXLPipeline,
)

import guarded_diffusers
from guarded_diffusers import (
    GuardedFluxPipeline,
    GuardedStableDiffusionXLPipeline,
    NonFiniteError,
    guard,
    psnr,
    unguard,
)
from guarded_diffusers.testing import INJECTION_SITES, sample_inputs
from guarded_diffusers.testing.families import FAMILIES

# One site per family in its denoiser, and the VAE decoder where the family's call decodes in float16.
DENOISER_SITES = {
    "flux": "single_block_mlp",
    "flux_fill": "single_block_mlp",
    "flux_kontext": "double_block_ff",
    "qwen": "img_mlp",
    "sd3": "double_block_ff",
    "sdxl": "unet_mid_ff",
    "sd15": "unet_mid_ff",
}


def _build(
    family: str, site: str | None = None, dtype: torch.dtype = torch.float16
) -> tuple[DiffusionPipeline, str | None]:
    pipe = FAMILIES[family].build(0)
    module = FAMILIES[family].inject(pipe, site) if site is not None else None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype), module


def _images(pipe: DiffusionPipeline, family: str) -> np.ndarray:
    return pipe(**FAMILIES[family].call_kwargs()).images


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_guard_keeps_the_instance_its_components_and_class_checks(family):
    pipe, _ = _build(family)
    original = type(pipe)
    components = dict(pipe.components)
    guarded = guard(pipe)
    assert guarded is pipe and isinstance(pipe, original)
    assert type(pipe).__name__ == f"Guarded{original.__name__}"
    assert getattr(guarded_diffusers, type(pipe).__name__, type(pipe)) is type(
        pipe
    )  # a named one: not a copy
    assert all(pipe.components[name] is component for name, component in components.items())
    assert unguard(pipe) is pipe and type(pipe) is original and "guard" not in pipe.__dict__


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_clean_call_is_bit_identical_to_plain_diffusers(family):
    pipe, _ = _build(family)
    plain = _images(pipe, family)
    guarded = _images(guard(pipe), family)
    assert pipe.guard.last_report.incidents == []
    np.testing.assert_array_equal(guarded, plain)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_overflow_is_located_and_fixed_at_least_as_faithfully_as_bfloat16(family):
    site = DENOISER_SITES[family]
    reference = _images(_build(family, site, torch.float32)[0], family)
    bfloat16 = _images(_build(family, site, torch.bfloat16)[0], family)
    pipe, module = _build(family, site)
    plain = _images(pipe, family)
    assert not np.isfinite(plain).all() or psnr(plain, reference) < psnr(bfloat16, reference)
    output = guard(pipe)(**FAMILIES[family].call_kwargs())
    first = output.guard_report.incidents[0]
    assert (first.stage, first.module) == ("denoise", module)
    assert output.guard_report.recovered and not output.guard_report.degraded
    assert np.isfinite(output.images).all()
    assert psnr(output.images, reference) >= psnr(bfloat16, reference)


def test_unguard_reverts_every_fix_bit_for_bit():
    pipe, _ = _build("sdxl", "unet_mid_ff")
    before = state_snapshot(pipe)
    guard(pipe, strategies=["upcast"])(**FAMILIES["sdxl"].call_kwargs())
    assert pipe.guard.fixes
    unguard(pipe)
    assert state_snapshot(pipe) == before


def test_stages_come_from_the_components():
    assert [stage.name for stage in guard(_build("sdxl")[0]).guard.stages] == [
        "vae_encode",
        "vae_decode",
        "text_encoder",
        "text_encoder_2",
        "denoise",
    ]
    sd3 = guard(_build("sd3")[0])
    assert {"text_encoder_3", "denoise"} <= {stage.name for stage in sd3.guard.stages}
    assert next(stage for stage in sd3.guard.stages if stage.name == "denoise").component == "transformer"


@pytest.mark.parametrize("decoding", ["tiled", "sliced"])
def test_a_decoder_overflow_is_found_and_fixed_in_tiled_and_sliced_decoding(decoding):
    pipe, module = _build("sd15", "vae_decoder")
    kwargs = FAMILIES["sd15"].call_kwargs(size=32)
    if decoding == "tiled":
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, 16 // pipe.vae_scale_factor
    else:
        pipe.vae.enable_slicing()
        kwargs["num_images_per_prompt"] = 2
    pieces = []
    handle = pipe.vae.decoder.register_forward_hook(lambda *_: pieces.append(1))
    pipe(**kwargs)  # plain diffusers: how many decoder calls one decode makes
    handle.remove()
    assert len(pieces) > 1  # tile by tile, or image by image
    output = guard(pipe)(**kwargs)
    assert [(i.stage, i.module) for i in output.guard_report.incidents][:1] == [("vae_decode", module)]
    assert output.guard_report.recovered and np.isfinite(output.images).all()


def test_named_classes_load_save_and_hand_back_the_diffusers_class(tmp_path):
    FAMILIES["sdxl"].save(tmp_path)
    pipe = GuardedStableDiffusionXLPipeline.from_pretrained(tmp_path, dtype=torch.float16)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.guard.fixes == []
    pipe.save_pretrained(tmp_path / "again")
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "again")) is StableDiffusionXLPipeline
    shared = GuardedFluxPipeline.from_pipe(_build("flux")[0])
    assert isinstance(shared, FluxPipeline) and shared.guard.fixes == []


def test_a_class_without_a_named_guarded_class_gets_one_made_once():
    class StudioFluxPipeline(FluxPipeline):
        pass

    first, second = (StudioFluxPipeline(**_build("flux")[0].components) for _ in range(2))
    assert type(guard(first)) is type(guard(second))
    assert type(first).__name__ == "GuardedStudioFluxPipeline" and isinstance(first, StudioFluxPipeline)


def test_a_pipeline_without_a_step_callback_reports_the_scheduler_unchecked():
    class PlainCallFluxPipeline(FluxPipeline):
        def __call__(
            self, prompt, height, width, num_inference_steps, max_sequence_length, output_type, generator
        ):
            return super().__call__(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                max_sequence_length=max_sequence_length,
                output_type=output_type,
                generator=generator,
            )

    pipe = guard(PlainCallFluxPipeline(**_build("flux")[0].components))
    kwargs = {k: v for k, v in FAMILIES["flux"].call_kwargs().items() if k != "guidance_scale"}
    report = pipe(**kwargs).guard_report
    assert report.unchecked == ["scheduler_step"] and "unchecked stages: scheduler_step" in str(report)


def test_guarding_again_with_other_settings_is_refused_and_bad_settings_change_nothing():
    pipe, _ = _build("sd15")
    with pytest.raises(ValueError, match="upcsat"):
        guard(pipe, strategies=["upcsat"])
    assert type(pipe) is not GuardedStableDiffusionXLPipeline and "guard" not in pipe.__dict__
    assert guard(guard(pipe)) is pipe
    with pytest.raises(ValueError, match="unguard"):
        guard(pipe, strategies=["clamp"])
    with pytest.raises(TypeError, match="diffusers pipeline"):
        guard(object())  # type: ignore[type-var]


def test_strict_fidelity_raises_with_the_report_when_only_clamp_may_act():
    pipe, module = _build("sd15", "unet_mid_ff")
    guard(pipe, strategies=["clamp"], fidelity="strict")
    with pytest.raises(NonFiniteError) as raised:
        pipe(**FAMILIES["sd15"].call_kwargs())
    assert raised.value.report.incidents[0].module == module


def test_a_controlnet_is_a_stage_of_its_own_located_at_the_step_it_overflowed():
    base = FAMILIES["flux"].build(0)
    accepted = inspect.signature(FluxControlNetModel.__init__).parameters
    config = {key: value for key, value in base.transformer.config.items() if key in accepted}
    torch.manual_seed(1)
    controlnet = FluxControlNetModel(**{**config, "num_layers": 1, "num_single_layers": 1})
    # The double-block site, injected in the ControlNet's own double block.
    site = INJECTION_SITES["double_block_ff"](types.SimpleNamespace(transformer=controlnet), 0)
    pipe = guard(FluxControlNetPipeline(**base.components, controlnet=controlnet).to(torch.float16))
    assert next(stage for stage in pipe.guard.stages if stage.name == "controlnet").per_step
    kwargs = {**FAMILIES["flux"].call_kwargs(), "control_image": sample_inputs(32)["image"]}
    output = pipe(**kwargs)
    first = output.guard_report.incidents[0]
    assert (first.stage, first.step, first.module) == (
        "controlnet",
        0,
        site.replace("transformer.", "controlnet.", 1),
    )
    assert output.guard_report.recovered and np.isfinite(output.images).all()


def test_guard_hands_out_the_named_class_the_package_exports_after_its_module_ran_again():
    """pytester's in-process runs (and importlib.reload) run a module again: a new class object of
    the same name. guard() must give the one ``guarded_diffusers`` exports now, not the first one."""
    probe = (
        "import sys\n"
        "from guarded_diffusers.pipelines import guarded\n"
        "import guarded_diffusers.pipelines.classes\n"
        "for name in [m for m in list(sys.modules) if m.startswith('guarded_diffusers.')]:\n"
        "    if name != guarded.__name__:\n"
        "        del sys.modules[name]\n"
        "from guarded_diffusers import GuardedFluxPipeline, guard\n"
        "from guarded_diffusers.testing import tiny_flux_pipeline\n"
        "print(type(guard(tiny_flux_pipeline(0))) is GuardedFluxPipeline)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]
