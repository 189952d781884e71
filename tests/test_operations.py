"""Ordinary diffusers operations on a guarded pipeline with a fix held: dtype casts, from_pipe, QKV
fusion, copies. Each works as on the plain pipeline, and reset() gives the weights the plain
pipeline has after the same operations, bit for bit."""

from __future__ import annotations

import copy
import inspect
import pickle

import numpy as np
import pytest
import torch
from conftest import all_finite, fill, hook_count, load, state_snapshot
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline, guard, psnr, unguard
from guarded_diffusers.testing import inject_overflow, tiny_flux_fill_pipeline

ISLAND_SITE = "single_block_mlp"  # upcast holds a float32 island on single_transformer_blocks.0
RESIDUAL_SITE = "double_block_ff_residual"  # residual carries the double block's stream in float32


def held(saved_model, strategy: str | None, site: str = ISLAND_SITE) -> GuardedFluxFillPipeline:
    """A float16 guarded pipeline holding the fix ``strategy`` makes at ``site`` (None: the default
    strategies, whose fixes must include a residual one)."""
    folder, _ = saved_model(site)
    strategies = [strategy] if strategy else None
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_strategies=strategies,
        guard_max_extra_memory=0.2,
    )
    report = fill(pipe).guard_report
    assert report.recovered and (strategy or "residual") in [fix.strategy for fix in pipe.guard.fixes], report
    return pipe


def plain_after(saved_model, site: str, *operations) -> dict:
    """The weights of the plain pipeline after the same operations (``pipe.to(float16)`` alone
    casts T5's float32 ``wo``, in plain diffusers too)."""
    folder, _ = saved_model(site)
    pipe = load(FluxFillPipeline, folder, torch.float16)
    for operation in operations:
        operation(pipe)
    return state_snapshot(pipe)


def to(dtype):
    return lambda pipe: pipe.to(dtype)


@pytest.mark.parametrize("strategy", ["upcast", "rescale"])
def test_to_the_same_dtype_keeps_the_fix_and_calls_work(saved_model, strategy):
    pipe = held(saved_model, strategy)
    held_before = pipe.guard.in_force()
    pipe.to(torch.float16)
    output = fill(pipe)
    assert all_finite(output.images)
    assert output.guard_report.incidents == []  # the fix held across the cast: nothing to detect
    assert pipe.guard.in_force() == held_before  # with the cost and error it measured
    pipe.guard.reset()
    assert state_snapshot(pipe) == plain_after(saved_model, ISLAND_SITE, to(torch.float16))


@pytest.mark.parametrize("strategy", ["upcast", "rescale"])
def test_a_new_dtype_is_the_new_baseline_and_the_way_back_works(saved_model, strategy):
    pipe = held(saved_model, strategy)
    pipe.to(torch.float32)
    assert pipe.guard.fixes == []  # made and measured for float16
    output = fill(pipe)
    assert all_finite(output.images) and output.guard_report.incidents == []  # float32 holds the peak
    pipe.guard.reset()
    assert state_snapshot(pipe) == plain_after(saved_model, ISLAND_SITE, to(torch.float32))

    pipe.to(torch.float16)
    output = fill(pipe)
    assert all_finite(output.images) and output.guard_report.recovered  # detected again in float16
    pipe.guard.reset()
    assert state_snapshot(pipe) == plain_after(saved_model, ISLAND_SITE, to(torch.float32), to(torch.float16))


def test_a_components_own_cast_lifts_only_that_components_fixes(saved_model):
    """Flux Fill runs only in one dtype (plain diffusers too fails with one component cast), so the
    VAE goes there and back; the transformer's island stays held all along."""
    pipe = held(saved_model, "upcast")
    island = pipe.guard.fixes[0]
    pipe.vae.to(torch.float32)
    pipe.vae.to(torch.float16)
    assert pipe.guard.fixes == [island]
    output = fill(pipe)
    assert all_finite(output.images) and output.guard_report.incidents == []
    pipe.guard.reset()
    round_trip = (lambda plain: plain.vae.to(torch.float32), lambda plain: plain.vae.to(torch.float16))
    assert state_snapshot(pipe) == plain_after(saved_model, ISLAND_SITE, *round_trip)


def test_moving_a_device_lifts_nothing(saved_model, monkeypatch):
    pipe = held(saved_model, "upcast")
    lifts = []
    monkeypatch.setattr(pipe.guard, "revert", lambda fixes: lifts.append(fixes))
    pipe.to("cpu")
    pipe.transformer.to("cpu")
    assert lifts == []


def test_from_pipe_with_a_dtype_while_a_fix_is_held(saved_model):
    pipe = held(saved_model, "upcast")
    other = GuardedFluxFillPipeline.from_pipe(pipe, torch_dtype=torch.float16)
    for each in (pipe, other):
        assert all_finite(fill(each).images)
    pipe.guard.reset()
    other.guard.reset()
    # As loaded: the guarded from_pipe casts as transformers loads, T5's float32 ``wo`` kept float32.
    assert state_snapshot(pipe) == plain_after(saved_model, ISLAND_SITE)


def test_fusing_qkv_projections_with_the_residual_fix_held(saved_model):
    pipe = held(saved_model, None, RESIDUAL_SITE)
    reference = fill(load(FluxFillPipeline, saved_model(RESIDUAL_SITE)[0], torch.float32)).images
    unfused = psnr(fill(pipe).images, reference)
    pipe.transformer.fuse_qkv_projections()
    fused = fill(pipe)
    assert fused.guard_report.incidents == [] and all_finite(fused.images)
    assert psnr(fused.images, reference) >= unfused - 1.0
    pipe.transformer.unfuse_qkv_projections()
    assert all_finite(fill(pipe).images)
    pipe.guard.reset()
    control = load(FluxFillPipeline, saved_model(RESIDUAL_SITE)[0], torch.float16)
    control.transformer.fuse_qkv_projections()
    control.transformer.unfuse_qkv_projections()
    assert state_snapshot(pipe) == state_snapshot(control)


def copy_by(how: str, pipe):
    return copy.deepcopy(pipe) if how == "deepcopy" else pickle.loads(pickle.dumps(pipe))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_holds_its_own_fixes_and_each_resets_to_its_own_weights(saved_model, how):
    pipe = held(saved_model, "upcast")
    before = pipe.guard.in_force()
    clone = copy_by(how, pipe)
    assert clone.transformer is not pipe.transformer and clone.guard is not pipe.guard
    assert clone.guard.in_force() == before == pipe.guard.in_force()
    for each in (clone, pipe):
        output = fill(each)
        assert all_finite(output.images) and output.guard_report.incidents == []
    loaded = plain_after(saved_model, ISLAND_SITE)
    clone.guard.reset()
    assert state_snapshot(clone) == loaded
    assert pipe.guard.fixes  # the original's fix is its own
    pipe.guard.reset()
    assert state_snapshot(pipe) == loaded


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_pipeline_guarded_in_place_and_never_called_copies(saved_model, how):
    folder, _ = saved_model()
    pipe = guard(load(FluxFillPipeline, folder, torch.float16))
    clone = copy_by(how, pipe)
    assert type(clone) is type(pipe) and isinstance(clone, FluxFillPipeline)
    assert hook_count(clone) == hook_count(pipe)
    np.testing.assert_array_equal(fill(clone).images, fill(pipe).images)


# -- diffusers' own introspection ------------------------------------------------------------


def test_encode_prompt_in_isolation_drives_a_pipeline_without_text_encoders(saved_model):
    """diffusers' own test_encode_prompt_works_in_isolation, on guarded pipelines: the embeddings of a
    pipeline holding only the text encoders feed one holding none, to the full pipeline's image."""
    folder, _ = saved_model()
    components = load(FluxFillPipeline, folder, torch.float32).components
    text = {k: (v if "text" in k or "tokenizer" in k else None) for k, v in components.items()}
    rest = {k: (None if "text" in k or "tokenizer" in k else v) for k, v in components.items()}
    encoder = guard(FluxFillPipeline(**text))
    names = inspect.signature(encoder.encode_prompt).parameters
    assert list(names) == list(inspect.signature(FluxFillPipeline(**text).encode_prompt).parameters)
    prompt_embeds, pooled_prompt_embeds, _ = encoder.encode_prompt(prompt="a cup", max_sequence_length=32)
    without = guard(FluxFillPipeline(**rest))
    without.set_progress_bar_config(disable=True)
    full = guard(FluxFillPipeline(**components))
    full.set_progress_bar_config(disable=True)
    image = fill(without, prompt=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
    np.testing.assert_allclose(image.images, fill(full, prompt="a cup").images, atol=1e-4)


# -- what already held, kept so ------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> tuple:
    """A model overflowing in the transformer and in the VAE decoder: (folder, [module per site])."""
    folder = tmp_path_factory.mktemp("two-sites")
    pipe = tiny_flux_fill_pipeline(seed=0)
    modules = [inject_overflow(pipe, site) for site in ("single_block_mlp", "vae_decoder")]
    pipe.save_pretrained(folder)
    return folder, modules


@pytest.mark.parametrize("order", ["first-made first", "last-made first"])
def test_two_guarded_pipelines_sharing_modules_with_different_fixes_reset_in_either_order(two_sites, order):
    folder, _ = two_sites
    first = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_strategies=["upcast"],
        guard_max_extra_memory=0.2,
    )
    second = GuardedFluxFillPipeline.from_pipe(first, guard_strategies=["rescale"])
    loaded = state_snapshot(first)
    fill(first, output_type="latent")  # no decode: the first fixes the transformer only
    second.transformer.to(torch.float16)  # an operation lifting both guards' fixes on the transformer
    fill(second)
    assert first.guard.fixes and second.guard.fixes
    guards = [first.guard, second.guard] if order == "first-made first" else [second.guard, first.guard]
    for each in guards:
        each.reset()
    assert state_snapshot(first) == loaded


def test_unguard_leaves_no_hook_a_plain_call_does_not_leave(two_sites):
    folder, _ = two_sites
    plain = load(FluxFillPipeline, folder, torch.float32)
    fill(plain)  # transformers hangs its own hooks on CLIP's layers at the first call
    pipe = guard(load(FluxFillPipeline, folder, torch.float16), strategies=["upcast"], max_extra_memory=0.2)
    fill(pipe)
    pipe.to(torch.float16)
    copy.deepcopy(pipe)
    unguard(pipe)
    assert hook_count(pipe) == hook_count(plain)
