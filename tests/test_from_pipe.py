"""from_pipe shares modules without casting them; with a dtype it casts the way from_pretrained loads."""

from __future__ import annotations

import pytest
import torch
from conftest import fill, load, state_snapshot
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline


def _dtypes(pipe) -> dict[str, torch.dtype]:
    return {name: dtype for name, (dtype, _) in state_snapshot(pipe).items()}


@pytest.mark.parametrize("strategy", ["upcast", "rescale"])
def test_from_pipe_recovery_and_reset_never_change_a_source_module(saved_model, strategy):
    folder, _ = saved_model("t5_ff")
    source = load(FluxFillPipeline, folder, torch.float16)
    wo = [name for name in _dtypes(source) if ".DenseReluDense.wo." in name]
    assert wo and {_dtypes(source)[name] for name in wo} == {torch.float32}  # transformers' keep-in-fp32
    before = state_snapshot(source)

    pipe = GuardedFluxFillPipeline.from_pipe(source, guard_strategies=[strategy])
    pipe.set_progress_bar_config(disable=True)
    assert state_snapshot(source) == before and state_snapshot(pipe) == before

    assert fill(pipe).guard_report.incidents  # the injected overflow was found and fixed
    assert {_dtypes(source)[name] for name in wo} == {torch.float32}
    pipe.guard.reset()
    assert state_snapshot(source) == before and state_snapshot(pipe) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_pipe_with_a_dtype_casts_like_from_pretrained(saved_model, dtype):
    folder, _ = saved_model()
    source = load(FluxFillPipeline, folder, torch.float32)
    pipe = GuardedFluxFillPipeline.from_pipe(source, dtype=dtype)
    assert _dtypes(pipe) == _dtypes(source) == _dtypes(load(FluxFillPipeline, folder, dtype))


def test_from_pipe_of_a_float32_pipeline_stays_float32(saved_model):
    folder, _ = saved_model()
    source = load(FluxFillPipeline, folder, torch.float32)
    before = state_snapshot(source)
    GuardedFluxFillPipeline.from_pipe(source)
    assert state_snapshot(source) == before
