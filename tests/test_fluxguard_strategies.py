"""pytest_fluxguard.strategies: every drawn call is one FluxFillPipeline accepts, edges included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load
from diffusers import FluxFillPipeline
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from pytest_fluxguard import recipes
from pytest_fluxguard.strategies import fill_inputs, images, masks, prompts, sizes

TINY_MULTIPLE = 4  # 2 * vae_scale_factor of guarded_diffusers.testing.TINY


@pytest.fixture(scope="module")
def float32_pipe(saved_model):
    folder, _ = saved_model()
    return load(FluxFillPipeline, folder, torch.float32)


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_drawn_calls_run_on_the_real_pipeline_and_replay_exactly(float32_pipe, data):
    example = data.draw(
        fill_inputs(max_size=16, multiple=TINY_MULTIPLE, max_steps=2, max_images=2, max_sequence_length=32)
    )
    first = float32_pipe(**example.pipeline_kwargs(), output_type="np").images
    again = float32_pipe(**example.pipeline_kwargs(), output_type="np").images
    assert first.shape == (example.num_images_per_prompt, example.height, example.width, 3)
    np.testing.assert_array_equal(first, again)


@given(size=sizes(max_size=40, multiple=8))
def test_sizes_are_positive_multiples_up_to_the_maximum(size):
    for side in size:
        assert 8 <= side <= 40 and side % 8 == 0


def test_an_impossible_maximum_size_is_refused_with_the_smallest_legal_one():
    with pytest.raises(ValueError, match="max_size 8 is below the smallest legal size, 16 pixels"):
        fill_inputs(max_size=8)


@given(st.data())
def test_pictures_have_the_asked_size_mode_and_binary_masks(data):
    height, width = data.draw(sizes(max_size=24, multiple=4))
    mask, image = data.draw(masks(height, width)), data.draw(images(height, width))
    assert (mask.mode, mask.size, image.mode, image.size) == ("L", (width, height), "RGB", (width, height))
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


@given(st.data())
def test_each_recipe_replays_to_the_same_picture(data):
    picture = data.draw(st.one_of(masks(12, 8), images(12, 8)))
    replayed = eval(recipes.recipe(picture), vars(recipes))  # the text a failing example prints
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(picture))


def _painted(mask):
    return np.asarray(mask) > 0


def _find(strategy, condition):
    """An example meeting ``condition``; fails the test when 500 draws hold none."""
    return find(strategy, condition, settings=settings(database=None, max_examples=500))


@pytest.mark.parametrize(
    "kind",
    [
        lambda m: not m.any(),  # empty
        lambda m: m.all(),  # full
        lambda m: 0 < m.sum() <= 16 and not m[:, 0].any() and not m[0].any(),  # thin, away from borders
        lambda m: m[:, -1].all() and not m[:, 0].any(),  # a band on the right border
    ],
    ids=["empty", "full", "thin-stroke", "right-border"],
)
def test_mask_strategy_reaches_each_kind_of_region(kind):
    _find(masks(16, 16), lambda mask: bool(kind(_painted(mask))))


def test_prompts_reach_empty_non_ascii_and_longer_than_the_token_limit():
    strategy = prompts(max_sequence_length=32)
    _find(strategy, lambda prompt: prompt == "")
    _find(strategy, lambda prompt: any(ord(c) > 127 for c in prompt))
    longest = _find(strategy, lambda prompt: len(prompt.split()) > 32)
    assert len(longest.split()) >= 33
