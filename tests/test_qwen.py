"""QwenImagePipeline under guard(): its default call, a located and faithful recovery, exact reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import state_snapshot
from diffusers import QwenImagePipeline

from guarded_diffusers import guard, psnr
from guarded_diffusers.testing import tiny_qwen_image_pipeline
from guarded_diffusers.testing.families import FAMILIES

QWEN = FAMILIES["qwen"]


def _build(
    site: str | None = None, dtype: torch.dtype = torch.float16
) -> tuple[QwenImagePipeline, str | None]:
    pipe = QWEN.build(0)
    module = QWEN.inject(pipe, site) if site is not None else None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype), module


def _images(pipe: QwenImagePipeline) -> np.ndarray:
    return pipe(**QWEN.call_kwargs()).images


@pytest.fixture(scope="module")
def references() -> dict[str, dict[torch.dtype, np.ndarray]]:
    """Plain diffusers' images of each site's pipeline in float32 and bfloat16, once per module."""
    return {
        site: {dtype: _images(_build(site, dtype)[0]) for dtype in (torch.float32, torch.bfloat16)}
        for site in QWEN.sites
    }


def test_the_tokenizer_round_trips_and_the_template_markers_are_single_tokens():
    pipe = tiny_qwen_image_pipeline(0)
    text = pipe.prompt_template_encode.format("a red fox in the snow")
    ids = pipe.tokenizer(text).input_ids
    assert pipe.tokenizer.decode(ids) == text
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert pipe.tokenizer.tokenize(marker) == [marker]
    # The system turn is as long as with Qwen's vocabulary: the pipeline drops exactly it.
    system_turn = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(system_turn).input_ids) == pipe.prompt_template_encode_start_idx


def test_the_default_call_without_guidance_equals_plain_diffusers():
    pipe, _ = _build()
    assert "guidance_scale" not in QWEN.call_kwargs()
    plain = _images(pipe)
    guarded = _images(guard(pipe))
    assert pipe.guard.last_report.incidents == []
    np.testing.assert_array_equal(guarded, plain)


@pytest.mark.parametrize("site", sorted(QWEN.sites))
def test_an_overflow_is_named_and_fixed_at_least_as_faithfully_as_bfloat16(references, site):
    reference, bfloat16 = references[site][torch.float32], references[site][torch.bfloat16]
    pipe, module = _build(site)
    assert not np.isfinite(_images(pipe)).all()
    before = state_snapshot(pipe)
    output = guard(pipe)(**QWEN.call_kwargs())
    report = output.guard_report
    assert report.incidents[0].module == module
    assert report.recovered and not report.degraded and pipe.guard.fixes
    assert np.isfinite(output.images).all()
    assert psnr(output.images, reference) >= psnr(bfloat16, reference)
    pipe.guard.reset()
    assert state_snapshot(pipe) == before
