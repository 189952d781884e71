"""Non-finite user inputs are refused by name before any model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import count_calls, fill, load

from guarded_diffusers import GuardedFluxFillPipeline


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
