"""torch.compile: the guard watches compiled components from outside and diagnoses them eagerly."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import all_finite, fill, load
from diffusers import FluxFillPipeline

from guarded_diffusers import GuardedFluxFillPipeline


def graph_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) so far, from dynamo's own counters."""
    counters = torch._dynamo.utils.counters
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def compiled(pipe, how: str, backend: str):
    if how == "wrapped":
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    else:
        pipe.transformer.compile(backend=backend)
    return pipe


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_a_clean_compiled_model_gets_no_graph_break_and_no_recompilation_from_the_guard(saved_model):
    folder, _ = saved_model()
    plain = compiled(load(FluxFillPipeline, folder, torch.float16), "wrapped", "inductor")
    expected = fill(plain).images
    plain_counts = graph_counts()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    guarded = compiled(load(GuardedFluxFillPipeline, folder, torch.float16), "wrapped", "inductor")

    first = fill(guarded)
    counts = graph_counts()
    second = fill(guarded)

    assert first.guard_report.incidents == [] and second.guard_report.incidents == []
    assert counts == plain_counts  # the same graph breaks and graphs as plain diffusers compiled
    assert graph_counts() == counts  # and the second call compiles nothing
    assert (first.images == expected).all()


@pytest.mark.parametrize("how", ["wrapped", "in place"])
def test_an_overflow_in_a_compiled_transformer_is_located_and_fixed_as_in_eager_mode(saved_model, how):
    folder, overflowing = saved_model("single_block_mlp")
    [eager] = fill(load(GuardedFluxFillPipeline, folder, torch.float16)).guard_report.incidents
    pipe = compiled(load(GuardedFluxFillPipeline, folder, torch.float16), how, "eager")

    output = fill(pipe)
    _, graphs_after_fix = graph_counts()
    later = fill(pipe)

    assert all_finite(output.images) and all_finite(later.images)
    [incident] = output.guard_report.incidents
    assert "_orig_mod" not in incident.module + incident.fixed_module
    assert (incident.module, incident.strategy, incident.fixed_module, incident.recovered) == (
        overflowing,
        eager.strategy,
        eager.fixed_module,
        True,
    )
    assert later.guard_report.incidents == []
    assert graph_counts()[1] - graphs_after_fix <= 1  # at most one recompilation for the held fix
    assert [entry.module for entry in pipe.guard.plan().entries] == [eager.fixed_module]
