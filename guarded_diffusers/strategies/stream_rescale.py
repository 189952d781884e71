"""Stream rescale: the bake's exact power-of-two rescale, made at run time in the working dtype.

LayerNorm, RMSNorm and GroupNorm give the same output for ``c * x`` as for ``x``: a residual stream
read only by them (a cut, ``baking.cuts``) may take any power of two. When the stream overflows,
every writer of it (each block's output projection, the embedders) gets ``2**-k`` on its weight and
bias, and a layer reading it directly ``2**k`` on its weight, in place and in the working dtype.
The model then computes the same function, its stream ``2**k`` further from 65504: no float32
stream, no hook, no parameter memory, nothing more per step. Unlike ``residual``, the stream
stays in float16, so its precision next to a massive activation is float16's (measured per fix).

Where the stream lies: the failing call of the component is traced once with the bake's tracer
(``stream_cuts``, cached per component). ``k`` comes from the float32 peak the guard's diagnosis
measured at the first overflowing module (``Location.absmax``): a writer's output, or a block's
output (the stream it passes on); where the stream overflowed between modules (a gate, a sum) and a
normalisation is the first to see it, its input's float32 peak is measured on its caller. ``k`` is
the bake's: the smallest with ``peak * 2**-k <= 2**13``.

Exact in float32 (up to the norms' eps); in float16 except for scaled weights that become
subnormal, whose original bits the fix keeps, on the host, so ``revert()`` restores every weight
bit for bit. On a baked folder the weights already hold the bake's exponents; a run-time ``k`` is
measured on them and multiplies on top (``Guard.baked_exponents`` lists the bake's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..baking.choose import needed_exponent
from ..baking.cuts import Cut
from ..baking.graph import is_norm
from ..core.casting import float32_call, module_dtype
from ..core.checks import tensor_absmax
from ..core.compiled import eager_module
from ..core.gate import exclusive
from ..core.hookspecs import hookimpl
from ..core.locate import Location
from ..core.offload import reloading_blocker, stored
from ..core.plan import check_keys
from ..core.quantized import shift_blocker
from ..core.recovery import Declined, ModuleLookup
from .exact_scaling import ScaledTensor, scale_exactly
from .stream_cuts import ComponentCuts, component_cuts

NAME = "stream_rescale"
# A plan's exponent: float16's normal range spans 2**-14 to 2**16; more than this scales nothing useful.
MAX_EXPONENT = 30


@dataclasses.dataclass(eq=False)
class StreamRescaleFix:
    """``tensors`` (qualified name -> power of two) multiplied in place; ``revert()`` restores their bits."""

    module_name: str
    exponent: int
    tensors: dict[str, int]
    scaled: list[ScaledTensor]
    strategy: str = NAME

    @property
    def changed_modules(self) -> tuple[str, ...]:
        """Every layer it scaled: the guard measures a region that encloses them all (the component)."""
        return tuple(dict.fromkeys(name.rpartition(".")[0] for name in self.tensors))

    @property
    def inexact(self) -> int:
        """Scaled elements the working dtype could not hold exactly (float16 subnormals)."""
        return sum(scaled.inexact for scaled in self.scaled)

    @property
    def kept_bytes(self) -> int:
        """Host bytes kept to restore those elements bit for bit."""
        return sum(scaled.kept_bytes for scaled in self.scaled)

    def revert(self) -> None:
        with exclusive():
            for scaled in reversed(self.scaled):
                scaled.restore()
            self.scaled.clear()

    def describe(self) -> dict[str, Any]:
        return {"exponent": self.exponent, "tensors": dict(self.tensors)}


def _scale(tensors: Mapping[str, int], module_of: Callable[[str], nn.Module]) -> list[ScaledTensor]:
    """Scale every tensor, or none: one that would overflow its dtype undoes the others."""
    done: list[ScaledTensor] = []
    with exclusive():
        try:
            for name, exponent in tensors.items():
                owner, _, attr = name.rpartition(".")
                scaled = scale_exactly(stored(module_of(owner), attr), exponent)
                done.append(scaled)
                if exponent > 0 and not bool(torch.isfinite(scaled.tensor.float()).all()):
                    raise ValueError(f"{name} times 2**{exponent} overflows {scaled.tensor.dtype}")
        except BaseException:
            for scaled in reversed(done):
                scaled.restore()
            raise
    return done


def _norm_input_peak(location: Location) -> float:
    """The float32 peak of what the first overflowing normalisation read: its caller run in float32."""
    norm, caller = location.calls[0].module, location.calls[1]
    peaks: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda module, args: peaks.append(tensor_absmax(args[0])))
    try:
        with torch.no_grad():
            float32_call(caller.module, caller.args, caller.kwargs, location.memory_budget, caller.name)
    finally:
        handle.remove()
    return torch.stack(peaks).max().item() if peaks else math.nan


def _stream(location: Location, cuts: ComponentCuts) -> tuple[list[Cut | None], Callable[[], float | None]]:
    """The cuts the first overflowing module writes, reads or passes on, and how to get their float32
    peak (measured only once they prove scale-invariant)."""
    first = location.calls[0]
    if first.name in cuts.layers:  # a layer whose output overflowed
        return [cuts.written_by(first.name)], lambda: location.absmax
    if is_norm(first.module):  # the stream overflowed between modules; a normalisation saw it first
        return [cuts.read_by(first.name)], lambda: _norm_input_peak(location)
    # A block's output: the stream it passes on.
    return list(cuts.passed_on(first.name)), lambda: location.absmax


def _blocker(tensors: Mapping[str, int], module_of: Callable[[str], nn.Module]) -> str | None:
    for name in tensors:
        owner = name.rpartition(".")[0]
        if reason := shift_blocker(module_of(owner), owner):
            return reason.replace("rescale", NAME)
    return None


class StreamRescaleStrategy:
    """Scales an overflowing residual stream's writers by a power of two, in place, exactly."""

    name = NAME

    def recover(self, location: Location) -> StreamRescaleFix | None:
        component, first = location.calls[-1], location.calls[0]
        if len(location.calls) < 2:
            return None
        dtype = module_dtype(component.module)
        if dtype is None or not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
            raise Declined(f"{component.name} computes in {dtype}: nothing to fit back")
        root = eager_module(component.module)
        if reason := reloading_blocker(root, component.name):
            raise Declined(reason)
        cuts = component_cuts(component)
        targets, measure = _stream(location, cuts)
        if not targets or None in targets:
            raise Declined(f"no stream read by normalisations passes through {first.name}")
        for cut in targets:
            if not cut.scalable:
                why = cut.pinned or "no normalisation reads it"
                raise Declined(f"{cut.name} (at {first.name}) is not scale-invariant: {why}")
        peak = measure()
        if peak is None or not math.isfinite(peak):
            raise Declined(f"{first.name} is non-finite in float32 too: not a range overflow")
        k = needed_exponent(peak)
        if k == 0:
            raise Declined(f"the stream's float32 peak at {first.name} ({peak:.3g}) fits {dtype}")
        try:
            tensors = cuts.exponents(root, targets, k)
        except ValueError as error:
            raise Declined(str(error)) from None

        def module_of(name: str) -> nn.Module:
            return root.get_submodule(name.removeprefix(component.name).removeprefix("."))

        if reason := _blocker(tensors, module_of):
            raise Declined(reason)
        try:
            return StreamRescaleFix(first.name, k, tensors, _scale(tensors, module_of))
        except ValueError as error:
            raise Declined(str(error)) from None

    def validate(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> None:
        """Check a plan entry, changing nothing: the exponent, each tensor, its power of two."""
        _planned(params, modules)

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> StreamRescaleFix:
        k, tensors = _planned(params, modules)
        return StreamRescaleFix(module_name, k, tensors, _scale(tensors, modules))


def _planned(params: Mapping[str, Any], modules: ModuleLookup) -> tuple[int, dict[str, int]]:
    """A plan entry's exponent and tensors, checked against the model; ``ValueError`` naming the field."""
    check_keys(params, required=("exponent", "tensors"))
    k, tensors = params["exponent"], params["tensors"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_EXPONENT:
        raise ValueError(f"{NAME} needs an integer `exponent` in 1..{MAX_EXPONENT}, got {k!r}.")
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"{NAME} needs `tensors`, a non-empty mapping of tensor names to exponents.")
    for name, exponent in tensors.items():
        if isinstance(exponent, bool) or not isinstance(exponent, int) or exponent not in (k, -k):
            raise ValueError(f"`tensors`: {name} needs the exponent {k} or {-k}, got {exponent!r}.")
        owner, _, attr = str(name).rpartition(".")
        tensor = getattr(modules(owner), attr, None)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"`tensors`: {owner} has no floating tensor {attr!r}.")
    if reason := _blocker(tensors, modules):
        raise ValueError(f"`tensors`: {reason}.")
    return k, dict(tensors)


@hookimpl
def register_strategies(register: Any) -> None:
    register(StreamRescaleStrategy())
