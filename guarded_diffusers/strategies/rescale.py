"""Rescale: a power-of-two range shift that keeps every weight in the working dtype.

The overflowing module (the producer, a Linear or convolution) gets the weight and bias rows of
its out-of-range output channels multiplied by ``2**-k``, so those channels come out ``2**k``
times smaller and fit. The shift is undone where it is consumed: the first later Linear or
convolution inside an enclosing module whose input changed gets the matching input columns
multiplied by ``2**k``, unless a normalisation absorbs the shift first (VAE resnets: conv then
GroupNorm). Consumers are found by trial, not from knowledge of the architecture: the enclosing
module runs in float32 with and without the shift and the inputs of its layers are compared.

Exact (power-of-two products are exact in floating point) where the path from producer to
consumer is positively homogeneous: identity, ReLU, dropout, concatenation, T5's gated product.
Approximate through GELU or SiLU, whose ``f(x / 2**k) * 2**k`` differs from ``f(x)`` near the
knee. So every fix is measured before it is kept: the enclosing module's output in the working
dtype, with the shift, must stay within ``TOLERANCE`` (relative L2) of its float32 output.
Parameter memory does not change; ``revert()`` restores the original rows bit for bit.

Packed or quantized weights (GGUF, torchao, quanto, bitsandbytes) cannot be shifted: the strategy
declines, naming the layer. Weights that diffusers' layerwise casting stores in float8 are shifted
in their storage dtype (by their bits: CPU kernels do not index-copy float8), and the measurement
decides whether the bits a shift can lose there matter. Under accelerate's ``cpu_offload`` the
shift is made in the ``weights_map`` copies its hooks load from (``offload.stored``); group
offloading that reloads weights from disk or pinned copies would undo it, so the strategy declines.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..core.casting import Float32Island
from ..core.fidelity import relative_l2
from ..core.gate import exclusive
from ..core.hookspecs import hookimpl
from ..core.locate import Location, ModuleCall
from ..core.offload import reloading_blocker, stored
from ..core.options import DEFAULT_TOLERANCE
from ..core.plan import check_keys, is_real
from ..core.quantized import Unsupported, shift_blocker
from ..core.recovery import Declined, ModuleLookup
from .upcast import FIT_HEADROOM

# A shifted region's output may differ from its float32 output by this much (relative L2 norm):
# bfloat16's rounding unit, so a kept shift is never coarser than running in bfloat16. (The guard
# measures every fix again against its own ``guard_tolerance``; this one picks among shifts.)
TOLERANCE = DEFAULT_TOLERANCE
# Consumers compensated per fix at most (each needs one float32 run of the region to find).
MAX_CONSUMERS = 4

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Shifts = dict[int, int]  # channel -> k (a factor 2**-k on the producer, 2**k on its consumer)


def _channel_axis(layer: nn.Module) -> int:
    """Channels of a layer's activations: last for Linear, second for convolutions."""
    return -1 if isinstance(layer, nn.Linear) else 1


def _channel_norms(layer: nn.Module, tensor: torch.Tensor, order: float) -> torch.Tensor:
    """Per-channel vector norm of an activation of (or into) ``layer``, in float32."""
    moved = tensor.detach().float().movedim(_channel_axis(layer), -1)
    return torch.linalg.vector_norm(moved.reshape(-1, moved.shape[-1]), ord=order, dim=0)


@dataclasses.dataclass(eq=False)
class _Scaled:
    """One parameter slice multiplied by powers of two, with its original values kept for revert."""

    parameter: torch.Tensor
    axis: int
    index: torch.Tensor
    original: torch.Tensor

    def restore(self) -> None:
        with torch.no_grad():
            _index_copy(self.parameter, self.axis, self.index, self.original)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _index_copy(parameter: torch.Tensor, axis: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """``parameter.index_copy_`` by bits for float8 (no CPU kernel), as is for other dtypes."""
    if parameter.dtype.itemsize == 1 and parameter.is_floating_point():
        bits = _BITS[parameter.dtype.itemsize]
        parameter.data.view(bits).index_copy_(axis, index, values.view(bits))
    else:
        parameter.index_copy_(axis, index, values)


@torch.no_grad()
def _scale_slices(parameter: torch.Tensor, axis: int, exponents: Shifts) -> _Scaled:
    """Multiply slices ``parameter[..., c, ...]`` (along ``axis``) by ``2**exponents[c]``, in place."""
    index = torch.tensor(sorted(exponents), device=parameter.device)
    original = parameter.index_select(axis, index).clone()
    factors = torch.tensor([2.0 ** exponents[c] for c in sorted(exponents)], device=parameter.device)
    shape = [1] * parameter.dim()
    shape[axis] = -1
    _index_copy(parameter, axis, index, (original.float() * factors.view(shape)).to(parameter.dtype))
    return _Scaled(parameter, axis, index, original)


@dataclasses.dataclass(eq=False)
class RescaleFix:
    """Producer rows shifted down by ``2**k``, consumer columns up by ``2**k``; weights stay put in dtype."""

    module_name: str
    producer_shifts: Shifts
    consumer_shifts: dict[str, Shifts]
    relative_error: float | None
    scaled: list[_Scaled]
    strategy: str = "rescale"

    @property
    def changed_modules(self) -> tuple[str, ...]:
        """The producer and every consumer: the guard measures a region that encloses them all."""
        return (self.module_name, *self.consumer_shifts)

    def revert(self) -> None:
        with exclusive():
            for slices in reversed(self.scaled):
                slices.restore()
            self.scaled.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "producer_shifts": sorted(self.producer_shifts.items()),
            "consumer_shifts": {
                name: sorted(shifts.items()) for name, shifts in self.consumer_shifts.items()
            },
            "relative_error": self.relative_error,
        }


def _shift_producer(layer: nn.Module, shifts: Shifts) -> list[_Scaled]:
    down = {channel: -k for channel, k in shifts.items()}
    scaled = [_scale_slices(stored(layer, "weight"), 0, down)]
    if layer.bias is not None:
        scaled.append(_scale_slices(stored(layer, "bias"), 0, down))
    return scaled


def _compensate_consumer(layer: nn.Module, shifts: Shifts) -> _Scaled:
    return _scale_slices(stored(layer, "weight"), 1, shifts)


def _non_finite(scaled: list[_Scaled]) -> bool:
    return any(not _all_finite(s.parameter) for s in scaled)


def _all_finite(tensor: torch.Tensor) -> bool:
    """``isfinite`` has no CPU kernel for float8: those are checked in float32."""
    return bool(torch.isfinite(tensor if tensor.dtype.itemsize > 1 else tensor.float()).all())


class _RegionTrial:
    """Runs one enclosing call in float32, recording per-channel input norms of its later layers."""

    def __init__(self, region: ModuleCall, producer: nn.Module) -> None:
        self.region = region
        self.producer = producer
        self.names = {
            module: f"{region.name}.{name}" for name, module in region.module.named_modules() if name
        }

    def run(self) -> tuple[Any, dict[str, tuple[nn.Module, torch.Tensor]]]:
        """The region's float32 output and, for each layer called after the producer, its input norms."""
        seen_producer = False
        inputs: dict[str, tuple[nn.Module, torch.Tensor]] = {}

        def record(module: nn.Module, args: tuple) -> None:
            nonlocal seen_producer
            if module is self.producer:
                seen_producer = True
            elif seen_producer and isinstance(module, _LAYERS) and args and self.names[module] not in inputs:
                inputs[self.names[module]] = (module, _channel_norms(module, args[0], 2))

        handles = [module.register_forward_pre_hook(record) for module in self.names]
        island = Float32Island(self.region.module)
        try:
            with torch.no_grad():
                return self.region.in_float32(), inputs
        finally:
            island.revert()
            for handle in handles:
                handle.remove()


def _changed_channels(before: torch.Tensor, after: torch.Tensor) -> Shifts:
    """Channels whose norm moved by a power of two or more, with the exponent that undoes it."""
    shifts: Shifts = {}
    for channel in torch.nonzero((before > 0) & (after > 0)).flatten().tolist():
        exponent = round(math.log2(before[channel].item() / after[channel].item()))
        if exponent:
            shifts[channel] = exponent
    return shifts


class RescaleStrategy:
    """Shifts the overflowing layer's out-of-range channels by powers of two and compensates downstream."""

    name = "rescale"

    def recover(self, location: Location) -> RescaleFix | None:
        producer = location.calls[0]
        if not isinstance(producer.module, _LAYERS) or producer.input_dtype is None:
            return None
        component = location.calls[-1]
        blocker = shift_blocker(producer.module, producer.name) or reloading_blocker(
            component.module, component.name
        )
        if blocker is not None:
            raise Declined(blocker)
        limit = torch.finfo(producer.input_dtype).max / FIT_HEADROOM
        try:
            peaks = self._float32_channel_peaks(producer)
            if not torch.isfinite(peaks).all():
                return None
            for shifts in self._candidate_shifts(peaks, limit):
                # The component itself is never a region: a float32 run of it is too costly here.
                for region in location.calls[1:-1]:
                    fix = self._try(producer, region, shifts)
                    if fix is not None:
                        return fix
        except Unsupported as reason:  # a quantized layer in the region cannot run in float32
            raise Declined(str(reason)) from None
        return None

    @staticmethod
    def _float32_channel_peaks(producer: ModuleCall) -> torch.Tensor:
        island = Float32Island(producer.module)
        try:
            with torch.no_grad():
                return _channel_norms(producer.module, producer.in_float32(), math.inf)
        finally:
            island.revert()

    @staticmethod
    def _candidate_shifts(peaks: torch.Tensor, limit: float) -> Iterator[Shifts]:
        """Only the out-of-range channels first (linear consumers); then all channels alike (norms)."""
        exponents = torch.ceil(torch.log2(peaks / limit)).clamp(min=0).int().tolist()
        per_channel = {channel: k for channel, k in enumerate(exponents) if k > 0}
        if per_channel:
            yield per_channel
            uniform = dict.fromkeys(range(len(exponents)), max(exponents))
            if uniform != per_channel:
                yield uniform

    def _try(self, producer: ModuleCall, region: ModuleCall, shifts: Shifts) -> RescaleFix | None:
        """Shift, compensate the consumers inside ``region``, and keep the fix only if it measures well."""
        trial = _RegionTrial(region, producer.module)
        reference, baseline = trial.run()
        scaled = _shift_producer(producer.module, shifts)
        consumers: dict[str, Shifts] = {}
        try:
            for _ in range(MAX_CONSUMERS):
                changed = self._first_changed_consumer(trial, baseline, skip=consumers)
                if changed is None:
                    break
                name, layer, compensation = changed
                scaled.append(_compensate_consumer(layer, compensation))
                consumers[name] = compensation
            if _non_finite(scaled):
                raise _Rejected
            with torch.no_grad():
                error = relative_l2(region(), reference)
            if not error <= TOLERANCE:
                raise _Rejected
        except BaseException as failure:
            for slices in reversed(scaled):
                slices.restore()
            if isinstance(failure, _Rejected):
                return None
            raise
        return RescaleFix(producer.name, shifts, consumers, error, scaled)

    @staticmethod
    def _first_changed_consumer(
        trial: _RegionTrial, baseline: dict[str, tuple[nn.Module, torch.Tensor]], skip: Mapping[str, Shifts]
    ) -> tuple[str, nn.Module, Shifts] | None:
        """The first layer (not yet compensated) whose input channels the shift changed."""
        _, shifted = trial.run()
        for name, (layer, before) in baseline.items():
            compensation = {} if name in skip else _changed_channels(before, shifted[name][1])
            if compensation:
                if getattr(layer, "groups", 1) != 1:
                    raise _Rejected
                blocker = shift_blocker(layer, name)
                if blocker is not None:  # the shift cannot be undone where it is consumed
                    raise Declined(blocker)
                return name, layer, compensation
        return None

    def validate(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> None:
        """Check a plan entry, changing nothing: layers, channels, exponents the dtype holds, consumers."""
        _planned(module_name, params, modules)

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> RescaleFix:
        planned = _planned(module_name, params, modules)
        scaled = _shift_producer(planned.producer, planned.producer_shifts)
        try:
            for layer, shifts in planned.consumers.values():
                scaled.append(_compensate_consumer(layer, shifts))
            if _non_finite(scaled):  # checked alone, an entry can still overflow on top of another
                raise ValueError("the shifted weights are not finite together with the plan's other fixes.")
        except BaseException:
            for slices in reversed(scaled):
                slices.restore()
            raise
        consumer_shifts = {name: shifts for name, (_, shifts) in planned.consumers.items()}
        relative_error = params.get("relative_error")
        return RescaleFix(module_name, planned.producer_shifts, consumer_shifts, relative_error, scaled)


class _Rejected(Exception):
    """This shift does not measure well in this region; undo it and try the next."""


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A plan entry's shift, checked against the model: the layers and each one's exponent per channel."""

    producer: nn.Module
    producer_shifts: Shifts
    consumers: dict[str, tuple[nn.Module, Shifts]]


def _planned(module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> _Planned:
    """Every check a plan entry needs before any weight moves; ``ValueError`` naming the parameter."""
    check_keys(params, required=("producer_shifts",), optional=("consumer_shifts", "relative_error"))
    producer = modules(module_name)
    if not isinstance(producer, _LAYERS):
        raise ValueError(
            f"rescale shifts Linear or convolution layers; {module_name} is {type(producer).__name__}."
        )
    component = module_name.partition(".")[0]
    blocker = shift_blocker(producer, module_name) or reloading_blocker(modules(component), component)
    if blocker is not None:
        raise ValueError(f"{blocker}.")
    shifts = _parse_shifts(params["producer_shifts"], producer, 0, "producer_shifts", module_name)
    named = params.get("consumer_shifts", {})
    if not isinstance(named, Mapping):
        raise ValueError(f"`consumer_shifts` is an object {{layer: shifts}}, not {type(named).__name__}.")
    consumers: dict[str, tuple[nn.Module, Shifts]] = {}
    for name, pairs in named.items():
        field = f"consumer_shifts.{name}"
        if not isinstance(name, str):
            raise ValueError(f"`{field}`: a consumer is named by a string, not {type(name).__name__}.")
        try:
            layer = modules(name)
        except KeyError as error:
            raise ValueError(f"`{field}`: {error.args[0]}.") from None
        if layer is producer or not isinstance(layer, _LAYERS) or getattr(layer, "groups", 1) != 1:
            kind = "the producer itself" if layer is producer else type(layer).__name__
            raise ValueError(f"`{field}`: a consumer is another Linear or ungrouped convolution, not {kind}.")
        blocker = shift_blocker(layer, name)
        if blocker is not None:
            raise ValueError(f"`{field}`: {blocker}.")
        consumers[name] = (layer, _parse_shifts(pairs, layer, 1, field, name))
    channels = producer.weight.shape[0]
    # Without a consumer the shift reaches the output: exact only when a normalisation divides it
    # out (VAE resnets: conv, then GroupNorm), and that takes one exponent on every channel.
    if not consumers and (len(shifts) != channels or len(set(shifts.values())) != 1):
        raise ValueError(
            f"`consumer_shifts` is empty, but a shift without a consumer is only undone by a normalisation "
            f"and must then be one exponent on all {channels} channels of {module_name}, not {len(shifts)}."
        )
    error = params.get("relative_error")
    if error is not None and not (is_real(error) and error >= 0):
        raise ValueError(f"`relative_error` must be null or a number >= 0, not {reprlib.repr(error)}.")
    return _Planned(producer, shifts, consumers)


def _parse_shifts(pairs: Any, layer: nn.Module, axis: int, field: str, module_name: str) -> Shifts:
    """``[[channel, exponent], ...]``: integer channels of ``layer``'s ``axis``, each once, exponents >= 1."""
    channels = layer.weight.shape[axis]
    top = math.floor(math.log2(torch.finfo(layer.weight.dtype).max))  # float16: 15
    if not isinstance(pairs, list | tuple) or not pairs:
        raise ValueError(f"`{field}` is a non-empty [[channel, exponent], ...], not {reprlib.repr(pairs)}.")
    shifts: Shifts = {}
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(type(v) is int for v in pair)):
            raise ValueError(f"`{field}` holds [[channel, exponent], ...] integers, not {reprlib.repr(pair)}")
        channel, exponent = pair
        if not 0 <= channel < channels:
            raise ValueError(
                f"`{field}`: rescale shifts for {module_name} name channels outside 0..{channels - 1} "
                f"({channel})."
            )
        if channel in shifts:
            raise ValueError(f"`{field}`: channel {channel} is shifted twice.")
        if not 1 <= exponent <= top:
            raise ValueError(
                f"`{field}`: exponent {exponent} of channel {channel} is outside 1..{top}, "
                f"the shifts {layer.weight.dtype} can hold."
            )
        shifts[channel] = exponent
    sign = -1 if axis == 0 else 1  # producer rows go down, consumer columns up
    bias = [stored(layer, "bias")] if axis == 0 and layer.bias is not None else []
    for tensor in [stored(layer, "weight"), *bias]:
        _check_representable(tensor, axis, {c: sign * k for c, k in shifts.items()}, field, module_name)
    return shifts


@torch.no_grad()
def _check_representable(
    tensor: torch.Tensor, axis: int, exponents: Shifts, field: str, module_name: str
) -> None:
    """The shifted slices must stay finite and keep every normal number non-zero, in the tensor's dtype."""
    if tensor.is_meta:
        return
    order = sorted(exponents)
    original = tensor.index_select(axis, torch.tensor(order, device=tensor.device))
    shape = [1] * tensor.dim()
    shape[axis] = -1
    factors = torch.tensor([2.0 ** exponents[c] for c in order], device=tensor.device).view(shape)
    shifted = (original.float() * factors).to(tensor.dtype)
    info = torch.finfo(tensor.dtype)
    if not _all_finite(shifted):
        raise ValueError(f"`{field}`: the shift takes weights of {module_name} past {tensor.dtype}'s max.")
    if ((shifted == 0) & (original.float().abs() >= info.tiny)).any():
        raise ValueError(f"`{field}`: the shift flushes weights of {module_name} to zero in {tensor.dtype}.")


@hookimpl
def register_strategies(register: Any) -> None:
    register(RescaleStrategy())
