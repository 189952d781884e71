"""Shared components and concurrent requests: the guard acts only on its own calls."""

from __future__ import annotations

import concurrent.futures
import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import all_finite, fill, load
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.core.fidelity import psnr

CLEAN_GUIDANCE, OVERFLOWING_GUIDANCE = 30.0, 100.0  # 100 x 1000 overflows float16 in the transformer
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def shared(saved_model):
    """A guarded pipeline and a plain one built from the very same modules (each its own scheduler,
    which holds per-call state in diffusers and is never safe to share between threads)."""
    folder, _ = saved_model()
    guarded = load(GuardedFluxFillPipeline, folder, torch.float16)
    plain = FluxFillPipeline(**{**guarded.components, "scheduler": copy.deepcopy(guarded.scheduler)})
    plain.set_progress_bar_config(disable=True)
    return folder, guarded, plain


def quiet_fill(pipe, seed, guidance):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain float16's NaN cast
        return fill(pipe, seed=seed, guidance_scale=guidance)


def test_a_plain_pipeline_sharing_the_modules_is_untouched_by_the_guard_and_its_fixes(shared):
    folder, guarded, plain = shared
    alone = fill(load(FluxFillPipeline, folder, torch.float16), guidance_scale=CLEAN_GUIDANCE).images

    fill(
        guarded, guidance_scale=OVERFLOWING_GUIDANCE
    )  # the guidance fix is now held on the shared transformer

    assert [fix.strategy for fix in guarded.guard.fixes] == ["guidance"]
    np.testing.assert_array_equal(fill(plain, guidance_scale=CLEAN_GUIDANCE).images, alone)
    guarded.guard.reset()


def test_forty_mixed_requests_from_two_threads(shared):
    """One thread serves the guarded pipeline, the other the plain one, clean and overflowing requests
    alternating; every result equals what that pipeline gives serving its requests alone."""
    folder, guarded, plain = shared
    requests = [
        (seed, (CLEAN_GUIDANCE, OVERFLOWING_GUIDANCE)[index % 2]) for index, seed in enumerate(SEEDS * 10)
    ]

    def serve(pipe):
        return [quiet_fill(pipe, seed, guidance) for seed, guidance in requests]

    guarded.guard.reset()
    alone = {"plain": serve(plain), "guarded": serve(guarded)}
    guarded.guard.reset()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        together = dict(zip(("plain", "guarded"), pool.map(serve, (plain, guarded)), strict=True))

    for which in ("plain", "guarded"):
        for first, second in zip(alone[which], together[which], strict=True):
            np.testing.assert_array_equal(second.images, first.images)
    reference = load(FluxFillPipeline, folder, torch.float32)
    bfloat16 = load(FluxFillPipeline, folder, torch.bfloat16)
    for (seed, guidance), output in list(zip(requests, together["guarded"], strict=True))[:4]:  # each kind
        expected = fill(reference, seed=seed, guidance_scale=guidance).images
        assert all_finite(output.images)
        bf16 = psnr(fill(bfloat16, seed=seed, guidance_scale=guidance).images, expected)
        assert psnr(output.images, expected) >= bf16 + 20.0
    reports = [output.guard_report for output in together["guarded"]]
    assert [len(report.incidents) for report in reports] == [0, 1] + [0] * 18  # fixed once, then held
    assert not all_finite(together["plain"][1].images)  # plain diffusers, as it is: black at guidance 100
    guarded.guard.reset()


def first_transformer_inputs(pipe):
    """One fill; returns the keyword arguments of the transformer's first call, for direct forwards."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs) if not seen else None, with_kwargs=True
    )
    try:
        quiet_fill(pipe, 0, CLEAN_GUIDANCE)
    finally:
        handle.remove()
    return seen[0]


def raw(tensor):
    return tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("strategy", ["upcast", "rescale"])
def test_a_fix_applied_and_reverted_never_shows_a_concurrent_forward_a_half_made_module(
    saved_model, strategy
):
    """While one thread applies and reverts a weight-changing fix again and again, another runs the
    shared transformer as plain diffusers: each output is bit for bit the unfixed or the fixed one
    (a forward between a producer's shift and its consumer's, or between two tensors' float32
    conversions, would give a third output or raise a dtype mismatch)."""
    folder, _ = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=1.0)
    pipe.guard.strategies = [s for s in pipe.guard.strategies if s.name == strategy]
    inputs = first_transformer_inputs(pipe)  # it overflows at proj_mlp: the guard fixes it
    plan = pipe.guard.plan()
    assert [entry.strategy for entry in plan.entries] == [strategy]
    pipe.guard.reset()
    with torch.no_grad():
        unfixed = raw(pipe.transformer(**inputs)[0])
        pipe.guard.apply_plan(plan)
        fixed = raw(pipe.transformer(**inputs)[0])
        pipe.guard.reset()
    assert fixed != unfixed

    def serve():
        outputs = []
        with torch.no_grad():
            for _ in range(150):
                try:
                    outputs.append(raw(pipe.transformer(**inputs)[0]))
                except RuntimeError as error:  # a dtype mismatch inside a half-converted module
                    outputs.append(str(error))
        return outputs

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        served = pool.submit(serve)
        toggles = 0
        while not served.done():
            pipe.guard.apply_plan(plan)
            pipe.guard.reset()
            toggles += 1
        outputs = served.result()

    assert toggles > 10
    seen = {
        "unfixed"
        if out == unfixed
        else "fixed"
        if out == fixed
        else out
        if isinstance(out, str)
        else "a third"
        for out in outputs
    }
    assert seen <= {"unfixed", "fixed"}
