"""The tiny offline models and the overflow injection that every other test relies on."""

from __future__ import annotations

import pytest
import torch
from conftest import all_finite, fill, load
from diffusers import FluxFillPipeline

from guarded_diffusers.testing import INJECTION_SITES, inject_overflow, tiny_flux_fill_pipeline


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
