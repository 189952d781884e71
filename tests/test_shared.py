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
