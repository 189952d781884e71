"""The building blocks on small plain modules: checks, float32 islands, diagnosis, escalation."""

from __future__ import annotations

import math

import torch
from torch import nn

from guarded_diffusers.core.casting import Float32Island
from guarded_diffusers.core.checks import absmax_on_device, host_absmax
from guarded_diffusers.core.locate import locate_first_overflow
from guarded_diffusers.strategies.upcast import UpcastStrategy


def test_absmax_propagates_nan_and_inf_across_tensors():
    finite = torch.tensor([1.0, -3.0], dtype=torch.float16)
    assert host_absmax((finite, {"x": torch.tensor([2.0])})) == 3.0
    assert math.isnan(host_absmax((finite, torch.tensor([float("nan"), 5.0]))))
    assert host_absmax([finite, torch.tensor([-float("inf")])]) == math.inf
    assert absmax_on_device((torch.tensor([1, 2]),)) is None


class _Block(nn.Module):
    """A residual MLP block: ``up`` overflows float16, ``down`` brings it back."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.down = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


def _overflowing_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _Block(), nn.LayerNorm(8))
    with torch.no_grad():
        model[1].up.weight.mul_(2.0**15)
        model[1].down.weight.mul_(2.0**-13)
    return model.half()


def test_float32_island_reverts_bit_for_bit_and_keeps_mixed_dtypes():
    model = _overflowing_model()
    model[1].down.float()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    island = Float32Island(model[1])
    assert {p.dtype for p in model[1].parameters()} == {torch.float32}
    assert model(torch.randn(2, 8, dtype=torch.float16)).dtype == torch.float16
    island.revert()
    after = model.state_dict()
    assert all(
        after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]) for name in before
    )
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks


def test_nested_islands_return_their_callers_dtype():
    model = _overflowing_model()
    inner, outer = Float32Island(model[1].up), Float32Island(model[1])
    assert model(torch.randn(2, 8, dtype=torch.float16)).dtype == torch.float16
    outer.revert()
    inner.revert()
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_locate_names_the_first_overflowing_module_and_its_enclosing_calls():
    model = _overflowing_model()
    x = torch.randn(16, 8, dtype=torch.float16) * 8
    assert not math.isfinite(host_absmax(model(x)))

    location = locate_first_overflow(model, "model", (x,), {})

    assert location.module_name == "model.1.up"
    assert [call.name for call in location.calls] == ["model.1.up", "model.1", "model"]
    assert location.absmax > torch.finfo(torch.float16).max
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_locate_returns_none_when_the_rerun_is_finite():
    model = _overflowing_model()
    assert locate_first_overflow(model, "model", (torch.zeros(1, 8, dtype=torch.float16),), {}) is None


def test_upcast_picks_the_smallest_enclosing_module_that_fits():
    model = _overflowing_model()
    x = torch.randn(16, 8, dtype=torch.float16) * 8
    location = locate_first_overflow(model, "model", (x,), {})

    fix = UpcastStrategy().recover(location)

    assert fix.module_name == "model.1"
    assert math.isfinite(host_absmax(model(x)))
    assert model[0].weight.dtype == torch.float16 and model[1].up.weight.dtype == torch.float32
    fix.revert()
    assert {p.dtype for p in model.parameters()} == {torch.float16}
