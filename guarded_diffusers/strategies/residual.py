"""Residual: the overflowing layer hands on a float32 result, and the residual stream carries it.

Real checkpoints overflow float16 through massive activations: a few channels of a layer's
output pass 65504 and the residual stream adds them up and passes them on, block after block,
until a normalisation divides them away. No region "fits back" into float16 there: the stream
itself is out of range, so a float32 island would have to take the whole component.

This fix keeps every weight in float16. The producing layer computes on its input scaled down by
``2**k`` (exact) and its output is scaled back up in float32, so its result is float32 at the cost
of one more float16 matmul of that one layer. PyTorch's type promotion then carries the residual
stream in float32 (``residual + x``), diffusers skips its float16-only clip, and a normalisation
brings values back to a normal range.
Every other Linear or convolution of the component casts a float32 input to its own weight dtype,
so the matmuls stay float16 on normalised inputs. Where a layer reads the stream before any
normalisation, that cast overflows, the guard sees it at once ("not held") and the next strategy
tries. Parameter memory does not change; ``revert()`` removes the hooks.

Quantized layers (GGUF, torchao, quanto, bitsandbytes, diffusers' layerwise casting) keep their
own way of computing: the producer's scaled-down matmul goes through the layer's own ``forward``
(its library dequantizes or casts as usual), and its bias, added there in the compute dtype, is
taken off and added again in float32. Other layers cast a float32 stream to the dtype they compute
in, not to their stored weight's (packed bytes or float8 storage).

Offloaded layers: the producer's recompute runs in a hook after its forward, when offloading has
put its weights away again. It reads them where they are kept (accelerate's ``weights_map`` for
parameters on the meta device, the module's own tensors on the offload device under group
offloading) and moves them to the input's device. A layer that group offloading to disk makes its
own group (leaf level) has empty tensors by then: the strategy declines there, naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.context import in_guarded_call
from ..core.hookspecs import hookimpl
from ..core.locate import Location
from ..core.offload import emptied_after_forward, stored
from ..core.quantized import compute_dtype, kind
from ..core.recovery import Declined, ModuleLookup
from .hooks import HookFix
from .upcast import FIT_HEADROOM

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The scaled-down result must fit the layer's dtype with this much room for later inputs.
_SCALE_HEADROOM = 2.0 * FIT_HEADROOM


@dataclasses.dataclass(eq=False)
class ResidualFix(HookFix):
    """``module_name`` returns float32 (input scaled by ``2**-exponent``); the component adapts dtypes."""

    exponent: int
    strategy: str = "residual"

    def describe(self) -> dict[str, Any]:
        return {"exponent": self.exponent}


def _cast_to_weight_dtype(layer: nn.Module, args: tuple) -> tuple | None:
    """A float32 stream reaching a float16 layer: hand it the dtype the layer computes in, as the
    model expects (its weight's, or its quantization library's compute dtype)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    dtype = compute_dtype(layer)
    if dtype is None or dtype == args[0].dtype:
        return None
    return (args[0].to(dtype), *args[1:])


def _loaded(layer: nn.Module, attr: str, like: torch.Tensor) -> torch.Tensor | None:
    """``layer.<attr>`` as its forward saw it, on ``like``'s device. The hook runs after the forward,
    when accelerate's ``cpu_offload`` has put the parameter back on the meta device (its values are in
    the hook's ``weights_map``, loaded in the parameter's dtype) and group offloading may have moved it
    to the offload device. Without offloading this is the parameter itself."""
    tensor = getattr(layer, attr)
    if tensor is None:
        return None
    return stored(layer, attr).to(device=like.device, dtype=tensor.dtype)


def _scaled_float32(layer: nn.Module, x: torch.Tensor, exponent: int) -> torch.Tensor:
    """``layer(x)`` in float32: the matmul in the layer's dtype on ``x * 2**-exponent`` (exact), then
    scaled back up and the bias added in float32."""
    scaled = x * 2.0**-exponent
    bias = _loaded(layer, "bias", x)
    bias = bias.float() if bias is not None else None
    shape = [1] * x.dim()
    shape[-1 if isinstance(layer, nn.Linear) else 1] = -1
    if kind(layer) is not None:
        # The layer's own forward (not ``layer(...)``: its hooks, this fix's among them, stay out),
        # so its library dequantizes or casts; the bias it added in its compute dtype is taken off.
        output = layer.forward(scaled).float()
        if bias is not None:
            output = output - bias.view(shape)
    elif isinstance(layer, nn.Linear):
        output = F.linear(scaled, _loaded(layer, "weight", x)).float()
    else:
        output = layer._conv_forward(scaled, _loaded(layer, "weight", x), None).float()
    output = output * 2.0**exponent
    return output if bias is None else output + bias.view(shape)


def _install(component: nn.Module, producer: nn.Module, module_name: str, exponent: int) -> ResidualFix:
    def float32_output(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # Recomputed from the layer's own input (one more matmul of this one layer), so whoever
        # watches the layer sees its true input and a float32 output. Only in guarded calls: a
        # plain pipeline sharing the layer keeps diffusers' numbers (and never feeds the casts).
        if not in_guarded_call():
            return None
        return _scaled_float32(layer, args[0], exponent)

    handles = [producer.register_forward_hook(float32_output)]
    handles += [
        layer.register_forward_pre_hook(_cast_to_weight_dtype)
        for layer in component.modules()
        if isinstance(layer, _LAYERS) and layer is not producer
    ]
    return ResidualFix(module_name, handles, exponent)


def _exponent(absmax: float, dtype: torch.dtype) -> int:
    """The smallest power of two that brings ``absmax`` under ``dtype``'s maximum with headroom."""
    return max(1, math.ceil(math.log2(absmax * _SCALE_HEADROOM / torch.finfo(dtype).max)))


class ResidualStrategy:
    """Carries an overflowing layer's result, and the residual stream after it, in float32."""

    name = "residual"

    def recover(self, location: Location) -> ResidualFix | None:
        producer = location.calls[0]
        weight = getattr(producer.module, "weight", None)
        if not isinstance(producer.module, _LAYERS) or not isinstance(weight, torch.Tensor):
            return None
        dtype = compute_dtype(producer.module)
        if dtype is None:
            raise Declined(f"cannot tell in which dtype {producer.name} ({kind(producer.module)}) computes")
        if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
            raise Declined(f"{producer.name} already computes in {dtype}")
        if location.absmax is None or not math.isfinite(location.absmax):
            raise Declined(f"{producer.name} is non-finite in float32 too: not a range overflow")
        if reason := emptied_after_forward(producer.module, producer.name):
            raise Declined(f"{reason}, where residual recomputes its output")
        component = location.calls[-1]
        exponent = _exponent(location.absmax, dtype)
        return _install(component.module, producer.module, producer.name, exponent)

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> ResidualFix:
        producer = modules(module_name)
        weight = getattr(producer, "weight", None)
        if not isinstance(producer, _LAYERS) or not isinstance(weight, torch.Tensor):
            raise ValueError(
                f"residual changes a Linear or convolution; {module_name} is {type(producer).__name__}."
            )
        if reason := emptied_after_forward(producer, module_name):
            raise ValueError(f"{reason}, where residual recomputes its output.")
        dtype = compute_dtype(producer)
        largest = (
            math.floor(math.log2(torch.finfo(dtype).max))
            if dtype is not None and dtype.is_floating_point
            else 0
        )
        exponent = params.get("exponent")
        if isinstance(exponent, bool) or not isinstance(exponent, int) or not 1 <= exponent <= largest:
            raise ValueError(
                f"residual needs an integer `exponent` in 1..{largest} for {dtype}, got {exponent!r}."
            )
        component = modules(module_name.split(".", 1)[0])
        return _install(component, producer, module_name, exponent)


@hookimpl
def register_strategies(register: Any) -> None:
    register(ResidualStrategy())
