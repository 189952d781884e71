"""Bad arguments (non-finite, empty, out of range, unreadable) are refused by name before any model runs."""

from __future__ import annotations

import functools
import inspect
import re

import numpy as np
import pytest
import torch
from conftest import count_calls, fill, load, state_snapshot
from diffusers import FluxFillPipeline
from PIL import Image

from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.pipelines.call_checks import validate_call_arguments
from guarded_diffusers.testing import sample_inputs


def _poisoned(value):
    value = value.clone() if isinstance(value, torch.Tensor) else value.copy()
    value[(0,) * value.ndim] = float("nan")
    return value


def _valid_inputs(pipe):
    embeds, pooled, _ = pipe.encode_prompt("a fox", None, max_sequence_length=32)
    return {
        "image": torch.rand(1, 3, 32, 32),
        "mask_image": np.ones((32, 32), dtype=np.float32),
        "latents": torch.randn(1, 64, 16, dtype=torch.float16),
        "masked_image_latents": torch.randn(1, 64, 32, dtype=torch.float16),
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
    }


@pytest.mark.parametrize(
    "argument",
    ["image", "mask_image", "latents", "masked_image_latents", "prompt_embeds", "pooled_prompt_embeds"],
)
def test_non_finite_argument_is_named_before_any_model_runs(saved_model, argument):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    inputs = _valid_inputs(pipe)
    calls = {
        name: count_calls(getattr(pipe, name))
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    bad = {argument: _poisoned(inputs[argument])}
    if argument in ("prompt_embeds", "pooled_prompt_embeds"):
        bad.update(
            prompt=None,
            prompt_embeds=inputs["prompt_embeds"],
            pooled_prompt_embeds=inputs["pooled_prompt_embeds"],
        )
        bad[argument] = _poisoned(inputs[argument])

    with pytest.raises(ValueError, match=rf"`{argument}` contains 1 non-finite value"):
        fill(pipe, **bad)
    assert all(count[0] == 0 for count in calls.values()), calls


def test_non_finite_tensor_inside_a_list_is_found(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="`image` contains 1 non-finite"):
        fill(pipe, image=[image, _poisoned(image)])


# Every model a fill call can run; none may run before a bad argument is refused.
_MODELS = ("text_encoder", "text_encoder_2", "vae.encoder", "transformer", "vae.decoder")


@pytest.fixture(scope="module")
def watched(saved_model):
    """A float16 pipeline and forward counters on each of its models, shared by the tests below."""
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    return pipe, {name: count_calls(functools.reduce(getattr, name.split("."), pipe)) for name in _MODELS}


def _refuses(watched, match: str, **overrides) -> None:
    pipe, calls = watched
    for count in calls.values():
        count[0] = 0
    with pytest.raises(ValueError, match=match):
        fill(pipe, **overrides)
    assert {name: count[0] for name, count in calls.items()} == dict.fromkeys(_MODELS, 0)


def _pictures(count: int) -> dict[str, list[Image.Image]]:
    inputs = sample_inputs(32)
    return {"image": [inputs["image"]] * count, "mask_image": [inputs["mask_image"]] * count}


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt_2": []}, "prompt_2"),
        ({"prompt": ["a fox", 3]}, "prompt"),
        ({"prompt_2": ["a", "b"]}, "prompt_2"),
        ({"prompt": ["a", "b"], "prompt_2": ["a"], **_pictures(2)}, "prompt_2"),
        ({"prompt": "a fox", **_pictures(2)}, "image"),
        ({"prompt": ["a", "b", "c"], **_pictures(2)}, "image"),
        ({"prompt": "a fox", "num_images_per_prompt": 3, **_pictures(2)}, "image"),
        ({"mask_image": _pictures(2)["mask_image"]}, "mask_image"),
        ({"prompt": ["a"] * 6, **_pictures(3), "mask_image": _pictures(2)["mask_image"]}, "mask_image"),
        ({"image": None}, "image"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"height": 0}, "height"),
        ({"height": -32}, "height"),
        ({"height": 2}, "height"),
        ({"height": 31.5}, "height"),
        ({"height": "32"}, "height"),
        ({"width": 0}, "width"),
        ({"width": True}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -1}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"strength": float("nan")}, "strength"),
        ({"strength": 0.0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"strength": "1"}, "strength"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"max_sequence_length": -1}, "max_sequence_length"),
        ({"max_sequence_length": 513}, "max_sequence_length"),
        ({"max_sequence_length": 2.5}, "max_sequence_length"),
    ],
    ids=repr,
)
def test_bad_argument_is_named_before_any_model_runs(watched, overrides, argument):
    _refuses(watched, rf"`{argument}`", **overrides)


@pytest.mark.parametrize("mode", ["1", "L", "I", "I;16", "F", "RGBA", "P", "LA", "CMYK", "YCbCr", "HSV"])
def test_pil_image_that_is_not_rgb_is_refused(watched, mode):
    image = sample_inputs(32)["image"]
    image = Image.new(mode, image.size) if mode == "I;16" else image.convert(mode)
    _refuses(watched, rf"`image` is a mode-'{re.escape(mode)}' PIL image.*convert\('RGB'\)", image=image)


def _mask(*values: float, dtype: type = np.float32) -> Image.Image:
    """A mode-F/I/I;16 mask (by ``dtype``): a 255 square with ``values`` written into its first row."""
    full = np.zeros((32, 32), dtype=dtype)
    full[8:24, 8:24] = values[0]
    full[0, : len(values)] = values
    return Image.fromarray(full)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (_mask(255, np.nan), "contains 1 non-finite"),
        (_mask(255, np.inf, -np.inf), "contains 2 non-finite"),
        (_mask(300), "is a mode-'F' image with values from 0 to 300"),
        (_mask(255, -1), "is a mode-'F' image with values from -1 to 255"),
        (_mask(1, 0.5), r"is a mode-'F' image with values in 0\.\.1"),
        (_mask(1, dtype=np.int32), r"is a mode-'I' image with values in 0\.\.1"),
        (_mask(65535, dtype=np.uint16), "is a mode-'I;16' image with values from 0 to 65535"),
        (sample_inputs(32)["mask_image"].convert("RGB").convert("LAB"), "is a mode-'LAB' PIL image"),
    ],
    ids=["nan", "inf", "above-255", "negative", "F-0..1", "I-0..1", "I;16-65535", "LAB"],
)
def test_pil_mask_out_of_range_or_unreadable_is_refused(watched, mask, match):
    _refuses(watched, f"`mask_image` {match}", mask_image=mask)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "I", "F"])
def test_pil_masks_diffusers_reads_as_levels_are_accepted(mode):
    mask = sample_inputs(32)["mask_image"].convert(mode)
    parameters = inspect.signature(FluxFillPipeline.__call__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    arguments = {**sample_inputs(32), "mask_image": mask}
    validate_call_arguments(
        arguments, defaults, 4, "FluxFillPipeline", GuardedFluxFillPipeline.required_inputs
    )


def test_mode_f_mask_in_levels_fills_like_mode_l(watched):
    pipe, _ = watched
    levels = sample_inputs(32)["mask_image"]
    as_float = Image.fromarray(np.asarray(levels, dtype=np.float32))
    expected = fill(pipe, mask_image=levels).images
    np.testing.assert_array_equal(fill(pipe, mask_image=as_float).images, expected)


@pytest.mark.parametrize(
    ("keyword", "value", "suggestion"),
    [
        ("dtype", "fp16", "torch.float16"),
        ("torch_dtype", "float16", "torch.float16"),
        ("dtype", "bf16", "torch.bfloat16"),
        ("dtype", "auto", "a torch.dtype such as torch.float16"),
        ("dtype", {"default": "float16"}, "torch.float16"),
    ],
)
def test_dtype_as_text_is_refused_before_loading(tmp_path, keyword, value, suggestion):
    label = f"{keyword}['default']" if isinstance(value, dict) else keyword
    match = rf"`{re.escape(label)}` must be a torch\.dtype.*{re.escape(suggestion)}"
    with pytest.raises(ValueError, match=match):
        GuardedFluxFillPipeline.from_pretrained(tmp_path / "not-loaded", **{keyword: value})


@pytest.mark.parametrize("value", ["fp16", {"default": torch.float16}])
def test_from_pipe_refuses_a_dtype_that_is_not_a_torch_dtype(watched, value):
    pipe, _ = watched
    before = state_snapshot(pipe)
    with pytest.raises(ValueError, match=r"`dtype` must be a torch\.dtype"):
        GuardedFluxFillPipeline.from_pipe(pipe, dtype=value)
    assert state_snapshot(pipe) == before


@pytest.mark.parametrize("name", ["guidance_scale", "strength", "num_inference_steps", "max_sequence_length"])
def test_a_none_is_the_pipelines_to_interpret_only_where_it_is_the_pipelines_own_default(name):
    """QwenImagePipeline defaults ``guidance_scale`` to None (diffusers decides what None means);
    FluxFillPipeline defaults it to 30, where None would fail deep in the pipeline."""
    arguments = {**sample_inputs(32), name: None}
    validate_call_arguments(arguments, {name: None}, 4, "QwenImagePipeline", {})
    with pytest.raises(ValueError, match=f"`{name}`"):
        validate_call_arguments(arguments, {name: 1}, 4, "FluxFillPipeline", {})
