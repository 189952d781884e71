"""A faulty strategy is recorded, undone and followed by the next one; attempts are bounded."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import all_finite, fill, hook_count, load, state_snapshot
from torch.utils import _pytree as pytree

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.casting import set_tensor_dtype
from guarded_diffusers.core.settle import MAX_ATTEMPTS_PER_INCIDENT
from guarded_diffusers.strategies import UpcastStrategy

SITE = "single_block_mlp"


@dataclasses.dataclass(eq=False)
class HookFix:
    """A fix made of forward hooks; ``leak`` of them stay behind on ``revert()`` (a buggy fix)."""

    strategy: str
    module_name: str
    handles: list
    leak: int = 0

    def revert(self):
        for handle in self.handles[self.leak :]:
            handle.remove()

    def describe(self):
        return {}


class Faulty:
    """A strategy that misbehaves in one way, through the public interface only."""

    def __init__(self, fault, name=None):
        self.fault = fault
        self.name = name or fault

    def recover(self, location):
        located, component = location.calls[0], location.calls[-1]
        if self.fault == "raises":
            located.module.register_forward_hook(lambda *_: None)
            set_tensor_dtype(located.module, "weight", torch.float32)
            raise RuntimeError("strategy bug")
        if self.fault == "not a fix":
            return "a string"
        if self.fault == "wrong shape":
            return self._hook(component, lambda t: t[..., :-1])
        if self.fault == "wrong dtype":
            return self._hook(component, lambda t: t.float())
        if self.fault == "no effect":
            return self._hook(located, lambda t: t)
        if self.fault == "leaky no effect":
            return self._hook(located, lambda t: t, extra_hooks=1)
        raise AssertionError(self.fault)

    def apply(self, module_name, params, modules):
        raise ValueError("not plannable")

    def _hook(self, call, transform, extra_hooks=0):
        def hook(module, args, output):
            return pytree.tree_map_only(torch.Tensor, transform, output)

        handles = [call.module.register_forward_hook(hook) for _ in range(1 + extra_hooks)]
        return HookFix(self.name, call.name, handles, leak=extra_hooks)


@pytest.mark.parametrize(
    ("fault", "outcome", "detail"),
    [
        (
            "raises",
            "raised",
            "RuntimeError: strategy bug; removed a hook left on .*proj_mlp; cast .*weight back",
        ),
        ("not a fix", "invalid", "returned str, not a Fix"),
        ("wrong shape", "invalid", "changed the output's shape or dtype"),
        ("wrong dtype", "invalid", "changed the output's shape or dtype"),
        ("no effect", "not held", "proj_mlp is still overflowing"),
        ("leaky no effect", "not held", "still overflowing; removed a hook left on .*proj_mlp"),
    ],
)
def test_a_faulty_strategy_is_recorded_undone_and_the_next_one_recovers(saved_model, fault, outcome, detail):
    folder, overflowing = saved_model(SITE)
    pipe = load_guarded(folder, [Faulty(fault), UpcastStrategy()])
    before = state_snapshot(pipe)

    output = fill(pipe)

    assert all_finite(output.images)
    [incident] = output.guard_report.incidents
    assert (incident.module, incident.strategy, incident.recovered) == (overflowing, "upcast", True)
    first, second = incident.attempts
    assert (first.strategy, first.outcome, second.outcome) == (fault, outcome, "applied")
    assert re.search(detail, first.detail), first.detail
    assert [fix.strategy for fix in pipe.guard.fixes] == ["upcast"]
    pipe.guard.reset()
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


def test_attempts_per_incident_are_bounded(saved_model):
    folder, overflowing = saved_model(SITE)
    useless = [Faulty("no effect", name=f"useless-{index}") for index in range(MAX_ATTEMPTS_PER_INCIDENT)]
    pipe = load_guarded(folder, [*useless, UpcastStrategy()])
    before = state_snapshot(pipe)

    with pytest.raises(NonFiniteError, match=f"Could not recover denoise at {overflowing}") as raised:
        fill(pipe)

    [incident] = raised.value.report.incidents
    assert [attempt.strategy for attempt in incident.attempts] == [s.name for s in useless]
    assert {attempt.outcome for attempt in incident.attempts} == {"not held"}
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


def load_guarded(folder, strategies):
    """A guarded float16 pipeline trying ``strategies`` (instances, not registered names) in order."""
    # room for the block's float32 island (7.4 % of the tiny pipeline; the default budget is 5 %)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=0.1)
    pipe.guard.strategies = strategies
    return pipe
