"""The tiny offline models and the overflow injection that every other test relies on."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import all_finite, fill, load
from diffusers import FluxFillPipeline

from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.testing import (
    INJECTION_SITES,
    LASTING_STREAM_SITES,
    RESIDUAL_SITES,
    SILENTLY_CLIPPED_SITES,
    TINY,
    inject_overflow,
    sample_inputs,
    tiny_flux_fill_pipeline,
)


def test_clean_model_round_trips_through_save_and_load_and_stays_finite_in_float16(saved_model):
    folder, module = saved_model()
    assert module is None
    assert (folder / "model_index.json").is_file()
    pipe = load(FluxFillPipeline, folder, torch.float16)
    assert pipe.transformer.dtype == torch.float16
    assert all_finite(fill(pipe).images)


def test_tokenizers_are_real_and_need_no_files():
    pipe = tiny_flux_fill_pipeline()
    clip_ids = pipe.tokenizer("a fox").input_ids
    t5_ids = pipe.tokenizer_2("a fox").input_ids
    assert clip_ids[0] == pipe.tokenizer.bos_token_id and clip_ids[-1] == pipe.tokenizer.eos_token_id
    assert len(clip_ids) == len("afox") + 2  # one token per byte, spaces split words
    assert t5_ids[-1] == pipe.tokenizer_2.eos_token_id and len(t5_ids) == len("a fox") + 1


@pytest.mark.parametrize("site", INJECTION_SITES)
def test_injected_model_overflows_only_in_float16(saved_model, site):
    folder, module = saved_model(site)
    assert module is not None
    for dtype in (torch.float32, torch.bfloat16):
        assert all_finite(fill(load(FluxFillPipeline, folder, dtype)).images), dtype
    assert not all_finite(fill(load(FluxFillPipeline, folder, torch.float16)).images)


def test_injection_names_a_module_that_exists():
    pipe = tiny_flux_fill_pipeline()
    for site in INJECTION_SITES:
        component, _, path = inject_overflow(pipe, site).partition(".")
        getattr(pipe, component).get_submodule(path)


def test_unknown_injection_site_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown injection site 'nope'.*single_block_mlp"):
        inject_overflow(tiny_flux_fill_pipeline(), "nope")


# Residual-stream sites: the thresholds their recipe promises. 32752 is half of float16's maximum,
# so a block output under it keeps room to double.
_REALISTIC_WEIGHT = 2e4
_FLOAT16_MAX = 65504.0
_FLOAT16_SAFE = 32752.0
# A clean tiny model's residual stream peaks near 2.7.
_NORMAL_STREAM = 16.0
# PSNR against float32, in dB: bfloat16 of a faithful model; how far below it clipped float16 falls;
# the injected float32 image against the clean model's; the tolerance on how much an input moves it.
_FAITHFUL_PSNR = 30.0
_CLIPPING_COST = 10.0
_NEAR_CLEAN_PSNR = 28.0
_SAME_SENSITIVITY_DB = 3.0
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_residual_site_names_a_module_that_exists_and_is_accepted_wherever_sites_are():
    pipe = tiny_flux_fill_pipeline()
    for site in RESIDUAL_SITES:
        component, _, path = inject_overflow(pipe, site).partition(".")
        getattr(pipe, component).get_submodule(path)
    assert set(SILENTLY_CLIPPED_SITES) < set(RESIDUAL_SITES)
    assert not set(RESIDUAL_SITES) & set(INJECTION_SITES)


def test_unknown_injection_site_error_lists_residual_sites_too():
    with pytest.raises(ValueError, match=r"residual-stream sites: .*double_block_ff_residual"):
        inject_overflow(tiny_flux_fill_pipeline(), "nope")


@pytest.mark.parametrize("site", RESIDUAL_SITES)
def test_residual_site_keeps_every_weight_realistic(site):
    pipe = tiny_flux_fill_pipeline()
    inject_overflow(pipe, site)
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for name, weight in getattr(pipe, component).named_parameters():
            assert weight.abs().max() <= _REALISTIC_WEIGHT, f"{component}.{name}"


@pytest.fixture(scope="module")
def residual_run(saved_model):
    """``residual_run(site)`` -> {dtype: (images, absmax by module)} at the injected and cancelling blocks."""
    cache: dict[str, dict] = {}

    def get(site: str) -> dict:
        if site not in cache:
            folder, layer = saved_model(site)
            cache[site] = {dtype: _fill_recording(folder, dtype, _watched(layer)) for dtype in DTYPES}
        return cache[site]

    return get


def _watched(layer):
    """The injected layer, its block (the residual stream after it), and the block that cancels it."""
    block = ".".join(layer.split(".")[:3])  # transformer.<blocks>.<index>
    blocks, index = block.split(".")[1:]
    cancelling = int(index) + 1 if blocks == "single_transformer_blocks" else 0
    return layer, block, f"transformer.single_transformer_blocks.{cancelling}"


def _fill_recording(folder, dtype, names):
    """Plain pipeline images, and the largest |output| each named module produced during the call."""
    pipe = load(FluxFillPipeline, folder, dtype)
    absmax = dict.fromkeys(names, 0.0)
    for name in names:
        component, _, path = name.partition(".")

        def record(_module, _args, output, name=name):
            for tensor in output if isinstance(output, tuple) else (output,):
                absmax[name] = max(absmax[name], tensor.float().abs().max().item())

        getattr(pipe, component).get_submodule(path).register_forward_hook(record)
    return fill(pipe).images, absmax


@pytest.mark.parametrize("site", RESIDUAL_SITES)
def test_residual_site_is_massive_in_float32_until_a_later_block_cancels_it(saved_model, residual_run, site):
    layer, block, cancelling = _watched(saved_model(site)[1])
    _, absmax = residual_run(site)[torch.float32]
    assert 1.1e5 < absmax[layer] < 1.3e5
    if site == "single_block_proj_out":
        assert 2e4 < absmax[block] < _FLOAT16_SAFE
    else:  # the residual stream itself
        assert absmax[block] > _FLOAT16_MAX
    # The cancelling block subtracts the same constant: the stream is back to a clean model's size.
    assert absmax[cancelling] < _NORMAL_STREAM


@pytest.mark.parametrize("site", RESIDUAL_SITES)
def test_residual_site_overflows_float16_clipped_or_black(saved_model, residual_run, site):
    layer, block, cancelling = _watched(saved_model(site)[1])
    runs = residual_run(site)
    (reference, _), (bfloat16, _), (float16, absmax) = (runs[dtype] for dtype in DTYPES)
    assert all_finite(reference) and all_finite(bfloat16)
    assert absmax[layer] == math.inf
    # bfloat16 has the range: it only rounds away the stream's small values in the massive channel.
    assert psnr(bfloat16, reference) > _FAITHFUL_PSNR
    if site not in SILENTLY_CLIPPED_SITES:
        assert not all_finite(float16)
        return
    # diffusers clips the single block's output: finite, the residual stream pinned at 65504...
    assert all_finite(float16) and absmax[block] == _FLOAT16_MAX
    assert runs[torch.float32][1][block] != _FLOAT16_MAX
    # ...and the cancelling block, whose float32 stream is back to normal, leaves it at -65504.
    assert absmax[cancelling] == _FLOAT16_MAX
    # So the image is finite and wrong: far worse than bfloat16's. Measured in the tiny model:
    # float16 18.1 dB against float32, bfloat16 38.7 dB (a clean model: 68.4 and 39.9).
    assert psnr(float16, reference) < psnr(bfloat16, reference) - _CLIPPING_COST


@pytest.fixture(scope="module")
def float32_responses(saved_model):
    """``float32_responses(site)`` -> float32 images for the sample inputs, another image, another prompt."""
    cache: dict[str | None, tuple] = {}

    def get(site: str | None) -> tuple:
        if site not in cache:
            pipe = load(FluxFillPipeline, saved_model(site)[0], torch.float32)
            cache[site] = (
                fill(pipe).images,
                fill(pipe, image=sample_inputs(32, seed=1)["image"]).images,
                fill(pipe, prompt="a blue car on a wet road").images,
            )
        return cache[site]

    return get


@pytest.mark.parametrize("site", RESIDUAL_SITES)
def test_residual_site_float32_image_still_follows_the_input(float32_responses, site):
    clean, clean_other_image, clean_other_prompt = float32_responses(None)
    injected, other_image, other_prompt = float32_responses(site)
    # Close to the model without massive activations (measured ~33 dB; ~18 dB when they were never
    # cancelled and every later LayerNorm saw only them)...
    assert psnr(injected, clean) > _NEAR_CLEAN_PSNR
    # ...and as sensitive to the input image and the prompt as that model is.
    for changed, clean_changed in ((other_image, clean_other_image), (other_prompt, clean_other_prompt)):
        assert psnr(changed, injected) < math.inf
        assert abs(psnr(changed, injected) - psnr(clean_changed, clean)) < _SAME_SENSITIVITY_DB


def test_single_block_residual_site_needs_a_next_block_to_cancel_it():
    with pytest.raises(ValueError, match="next single block"):
        inject_overflow(tiny_flux_fill_pipeline(), "single_block_residual", block=TINY.num_single_layers - 1)


# Lasting stream sites: the stream passes float16 in float32 and stays there to the output norm.
_LASTING_PEAK = (_FLOAT16_MAX, 2.0**17)
_LASTING_CLIPPED = {"single_block_stream_growth"}


def _norm_out_input_peak(pipe) -> list[float]:
    peaks: list[float] = []
    pipe.transformer.norm_out.register_forward_pre_hook(
        lambda module, args: peaks.append(args[0].float().abs().max().item())
    )
    return peaks


@pytest.mark.parametrize("site", sorted(LASTING_STREAM_SITES))
def test_lasting_stream_site_stays_past_float16_until_the_output_norm(saved_model, reference_images, site):
    folder, module = saved_model(site)
    pipe = tiny_flux_fill_pipeline()
    assert inject_overflow(pipe, site) == module
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for name, weight in getattr(pipe, component).named_parameters():
            assert weight.abs().max() <= _REALISTIC_WEIGHT, f"{component}.{name}"
    runs = {}
    for dtype in DTYPES:
        plain = load(FluxFillPipeline, folder, dtype)
        peaks = _norm_out_input_peak(plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float16's NaN cast
            runs[dtype] = fill(plain).images, max(peaks)
    (reference, stream), (bfloat16, _), (float16, half_stream) = (runs[dtype] for dtype in DTYPES)
    # Nothing cancels it: norm_out reads a stream past float16's range, in float32 finite.
    assert _LASTING_PEAK[0] < stream < _LASTING_PEAK[1] and all_finite(bfloat16)
    if site in _LASTING_CLIPPED:  # diffusers clips the single blocks' output: finite and wrong
        assert half_stream == _FLOAT16_MAX and all_finite(float16)
        clean = fill(load(FluxFillPipeline, saved_model()[0], torch.float16)).images
        assert psnr(float16, reference) < psnr(clean, reference_images()[0]) - _CLIPPING_COST
    else:
        assert not all_finite(float16)
