"""pytest_fluxguard.strategies: every drawn call is one FluxFillPipeline accepts, edges included."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import load
from diffusers import FluxFillPipeline
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from pytest_fluxguard import recipes
from pytest_fluxguard.strategies import (
    fill_inputs,
    images,
    masks,
    pipeline_vocabularies,
    prompts,
    realistic_prompts,
    sizes,
    token_prompts,
)

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
    return find(strategy, condition, settings=settings(database=None, max_examples=500, derandomize=True))


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


@pytest.fixture(scope="module")
def vocabularies():
    from guarded_diffusers.testing import tiny_flux_fill_pipeline

    pipe = tiny_flux_fill_pipeline()
    return pipe, pipeline_vocabularies(pipe, max_sequence_length=64)


def test_vocabularies_hold_the_ids_a_prompt_can_produce(vocabularies):
    pipe, (clip, t5) = vocabularies
    assert (clip.name, clip.limit, t5.name, t5.limit) == ("tokenizer", 77, "tokenizer_2", 64)
    upper = pipe.tokenizer.convert_tokens_to_ids("A")  # CLIP lowercases: no text gives this id
    assert upper not in clip.ids and pipe.tokenizer.convert_tokens_to_ids("a") in clip.ids
    for vocabulary, tokenizer in ((clip, pipe.tokenizer), (t5, pipe.tokenizer_2)):
        for token in vocabulary.ids[::7]:
            assert token in tokenizer(vocabulary.decode([token, token]), add_special_tokens=False).input_ids


def test_token_prompts_fill_the_clip_window_with_distinct_tokens_and_reach_every_token(vocabularies):
    pipe, vocabulary = vocabularies
    seen, windows = set(), []

    @settings(
        max_examples=60,
        database=None,
        deadline=None,
        derandomize=True,  # the same 60 prompts every run: the median below is a property of them
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(prompt=token_prompts(vocabulary))
    def draw(prompt):
        ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids[:75]
        seen.update(ids)
        windows.append(len(set(ids)))

    draw()
    assert sorted(windows)[len(windows) // 2] >= 40  # the median prompt shows CLIP 40+ distinct tokens
    assert len(seen & set(vocabulary[0].ids)) >= 0.9 * len(vocabulary[0].ids)


def test_prompts_with_vocabularies_are_mostly_token_prompts_and_shrink_to_one_token(vocabularies):
    pipe, vocabulary = vocabularies
    rare = pipe.tokenizer_2.convert_tokens_to_ids("^")
    found = _find(
        prompts(64, vocabulary),
        lambda prompt: rare in pipe.tokenizer_2(prompt, add_special_tokens=False).input_ids,
    )
    assert found == "^"


def _reaches(strategy, *conditions, examples: int = 200) -> None:
    """Fails unless every condition holds for some drawn value (generation only: no shrinking)."""
    held = [False] * len(conditions)

    @settings(max_examples=examples, database=None, deadline=None, derandomize=True, phases=[Phase.generate])
    @given(value=strategy)
    def draw(value):
        for index, condition in enumerate(conditions):
            held[index] = held[index] or bool(condition(value))

    draw()
    assert all(held), held


def test_realistic_prompts_have_weights_punctuation_numbers_casing_and_other_scripts():
    _reaches(
        realistic_prompts(),
        lambda prompt: re.search(r"\(\w[\w-]*:\d(\.\d)?\)", prompt),  # (red:1.3)
        lambda prompt: any(mark in prompt for mark in ",.;!|"),
        lambda prompt: any(character.isdigit() for character in prompt),
        lambda prompt: any(word.isupper() and len(word) > 2 for word in prompt.split()),
        lambda prompt: any(ord(character) > 0x2000 for character in prompt),
        lambda prompt: len(prompt.split()) > 40,
    )


def test_masks_reach_outpainting_and_images_reach_blown_out_regions():
    _reaches(masks(32, 32), lambda mask: 0.9 <= _painted(mask).mean() < 1.0)
    _reaches(images(32, 32), lambda image: (np.asarray(image) >= 250).all(axis=2).mean() > 0.2)


@settings(max_examples=20, deadline=None, database=None)
@given(
    example=fill_inputs(max_size=8, multiple=4, max_lora_scale=0.5), plain=fill_inputs(max_size=8, multiple=4)
)
def test_a_lora_scale_is_drawn_only_when_asked_and_goes_to_the_pipeline(example, plain):
    assert 0.0 <= example.lora_scale <= 0.5
    assert example.pipeline_kwargs()["joint_attention_kwargs"] == {"scale": example.lora_scale}
    assert "lora_scale=" in repr(example)
    assert plain.lora_scale is None and "joint_attention_kwargs" not in plain.pipeline_kwargs()
    assert "lora_scale" not in repr(plain)
