"""What the guard knows about quantized layers and layers whose weights are cast on the fly.

Users who run Flux in float16 on small GPUs also store its weights in fewer bits. Each library
keeps the weight in its own form, and each decides in its own place in which dtype a layer
computes, so a float32 island cannot simply convert ``.weight`` to float32:

- GGUF (``diffusers.quantizers.gguf``): ``GGUFLinear`` holds a packed ``uint8`` ``GGUFParameter``
  and dequantizes it to ``layer.compute_dtype`` on every call; inputs are not cast. Float32:
  set ``compute_dtype`` to float32 (and put it back).
- Layerwise casting (``diffusers.hooks.layerwise_casting``, ``enable_layerwise_casting``): a
  ``LayerwiseCastingHook`` in the module's ``HookRegistry`` casts the layer to its
  ``compute_dtype`` before each forward and back to its storage dtype (float8) after it, so a
  converted ``.data`` is undone on the next call. Float32: set the hook's ``compute_dtype``.
- torchao (``Int8Tensor`` and other ``TorchAOBaseTensor`` weights), optimum-quanto (``QTensor``
  weights of ``QLinear``) and bitsandbytes (``Int8Params``, ``Params4bit``): the weight is a
  quantized tensor that cannot change dtype. Float32: the layer's ``forward`` is replaced, for as
  long as it is asked, by a float32 ``F.linear`` (or convolution) on the weight dequantized to
  float32 on each call, so no float32 copy of the weight is kept between calls.

``Float32Compute`` switches every such layer under a module and puts each back exactly
(attributes and ``forward`` restored, no weight touched). The guard never converts the tensors
these libraries manage: ``managed_tensor_ids`` names them for ``casting``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LAYERWISE_CASTING_HOOK = "layerwise_casting"  # diffusers.hooks.layerwise_casting._LAYERWISE_CASTING_HOOK
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Unsupported(ValueError):
    """A quantized layer the guard cannot make compute in float32 (or shift); the message says why."""


def _class(module_name: str, name: str) -> type | None:
    """A class of an already imported library (never imports one: a model that uses it already has)."""
    return getattr(sys.modules.get(module_name), name, None)


def _is_instance(value: Any, module_name: str, name: str) -> bool:
    cls = _class(module_name, name)
    return cls is not None and isinstance(value, cls)


def layerwise_casting_hook(module: nn.Module) -> Any | None:
    """The ``LayerwiseCastingHook`` diffusers' ``enable_layerwise_casting`` put on ``module``, if any."""
    registry = module.__dict__.get("_diffusers_hook")
    get_hook = getattr(registry, "get_hook", None)
    hook = get_hook(_LAYERWISE_CASTING_HOOK) if callable(get_hook) else None
    return hook if hook is not None and hasattr(hook, "compute_dtype") else None


def is_gguf_layer(module: nn.Module) -> bool:
    return _is_instance(module, "diffusers.quantizers.gguf.utils", "GGUFLinear")


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight") if "weight" in module._parameters else None
    return weight if isinstance(weight, torch.Tensor) else None


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """A weight held in a quantized form: a tensor subclass (torchao, quanto, GGUF, bitsandbytes)."""
    return type(tensor) not in (torch.Tensor, nn.Parameter)


def _is_quanto_layer(module: nn.Module) -> bool:
    """An optimum-quanto module that quantizes its weight (``QLinear``, ``QConv2d``, ...)."""
    return (
        _class("optimum.quanto", "QTensor") is not None and getattr(module, "weight_qtype", None) is not None
    )


def kind(module: nn.Module) -> str | None:
    """Which library manages ``module``'s own weight: ``gguf``, ``layerwise casting``, ``torchao``,
    ``quanto``, ``bitsandbytes``, ``quantized`` (an unknown tensor subclass); ``None`` for a plain layer."""
    if is_gguf_layer(module):
        return "gguf"
    if layerwise_casting_hook(module) is not None:
        return "layerwise casting"
    if _is_quanto_layer(module):
        return "quanto"
    weight = _weight(module)
    if weight is None:
        return None
    if _is_instance(weight, "bitsandbytes.nn.modules", "Int8Params") or _is_instance(
        weight, "bitsandbytes.nn.modules", "Params4bit"
    ):
        return "bitsandbytes"
    if _is_instance(weight, "torchao.utils", "TorchAOBaseTensor"):
        return "torchao"
    if type(weight) not in (torch.Tensor, nn.Parameter):
        return "quantized"
    return None


def quantized_layers(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, layer, kind)`` for every layer under ``module`` (itself included) a library manages."""
    return [(name, layer, k) for name, layer in module.named_modules() if (k := kind(layer)) is not None]


def managed_tensor_ids(module: nn.Module) -> set[int]:
    """Ids of the parameters and buffers under ``module`` that a quantization library owns.

    Packed or quantized weights cannot change dtype, and layerwise casting's storage tensors are cast
    back by its hook after every call: the guard's dtype changes leave all of them alone.
    """
    ids: set[int] = set()
    for layer in module.modules():
        layer_kind = kind(layer)
        if layer_kind == "layerwise casting":
            ids.update(id(t) for t in [*layer.parameters(), *layer.buffers()])
        elif layer_kind is not None:
            ids.update(id(t) for t in layer.parameters(recurse=False) if is_quantized_tensor(t))
    return ids


def compute_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype ``layer`` computes its output in (``None`` when it cannot be told)."""
    layer_kind = kind(layer)
    if layer_kind == "gguf":
        return layer.compute_dtype
    if layer_kind == "layerwise casting":
        return layerwise_casting_hook(layer).compute_dtype
    if layer_kind == "bitsandbytes":
        dtype = getattr(layer, "compute_dtype", None)
        bias = getattr(layer, "bias", None)
        if dtype is None and isinstance(bias, torch.Tensor) and bias.is_floating_point():
            dtype = bias.dtype
        return dtype
    weight = _weight(layer)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return None


def shift_blocker(layer: nn.Module, name: str) -> str | None:
    """Why a power-of-two shift of ``layer``'s weight rows or columns is impossible; ``None`` if it is not."""
    layer_kind = kind(layer)
    if layer_kind in (None, "layerwise casting"):
        return None
    weight = _weight(layer)
    held = type(weight).__name__ if weight is not None else "no weight"
    return f"{name} holds {layer_kind} weights ({held}): rescale cannot shift packed or quantized weights"


def _own_dequantize(weight: Any) -> Callable[..., torch.Tensor] | None:
    """The weight type's own ``dequantize`` (every ``torch.Tensor`` has one, for torch's qtensors)."""
    method = getattr(type(weight), "dequantize", None)
    if method is None or method is torch.Tensor.dequantize:
        return None
    return weight.dequantize


def _dequantized(layer: nn.Module, layer_kind: str) -> torch.Tensor:
    """``layer``'s weight as a plain float32 tensor (made anew on each call)."""
    # quanto: its weight once frozen, else quantized on the fly as its own forward does.
    weight = layer.qweight if layer_kind == "quanto" else _weight(layer)
    if layer_kind == "bitsandbytes":
        if hasattr(weight, "quant_state") and weight.quant_state is not None:  # Params4bit
            import bitsandbytes.functional as bnb_functional

            return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
        if getattr(weight, "CB", None) is not None and getattr(weight, "SCB", None) is not None:  # Int8Params
            return weight.CB.float() * weight.SCB.float().view(-1, 1) / 127.0
        raise Unsupported(f"a bitsandbytes weight of {type(layer).__name__} holds no quantization state")
    dequantize = _own_dequantize(weight)
    if dequantize is None:
        raise Unsupported(f"its {type(weight).__name__} weight has no dequantize()")
    try:
        to_float32 = "output_dtype" in inspect.signature(dequantize).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        to_float32 = False
    plain = dequantize(output_dtype=torch.float32) if to_float32 else dequantize()
    return plain.float()


def _float32_forward(layer: nn.Module, layer_kind: str) -> Callable[..., torch.Tensor]:
    """A forward computing ``layer`` in float32 from its dequantized weight."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = _dequantized(layer, layer_kind)
        bias = layer.bias.float() if getattr(layer, "bias", None) is not None else None
        if isinstance(layer, _CONVOLUTIONS):
            return layer._conv_forward(x.float(), weight, bias)
        return F.linear(x.float(), weight, bias)

    return forward


def _check_float32_capable(name: str, layer: nn.Module, layer_kind: str) -> None:
    if layer_kind in ("gguf", "layerwise casting"):
        return
    if not isinstance(layer, (nn.Linear, *_CONVOLUTIONS)):
        raise Unsupported(
            f"{name} is a {type(layer).__name__} with {layer_kind} weights; guarded_diffusers computes only "
            "quantized Linear and convolution layers in float32"
        )
    if getattr(layer, "activation_qtype", None) is not None:
        raise Unsupported(f"{name} quantizes its activations too ({layer_kind}); a float32 run would not")
    if layer_kind in ("quantized", "torchao"):
        weight = _weight(layer)
        if _own_dequantize(weight) is None:
            raise Unsupported(
                f"{name} holds a {type(weight).__name__} weight that guarded_diffusers does not know how to "
                "compute in float32 (it has no dequantize())"
            )


class Float32Compute:
    """Every managed layer under ``module`` computes in float32 until ``restore()``.

    Nothing is converted: GGUF layers and layerwise-casting hooks get ``compute_dtype`` float32,
    other quantized layers a float32 ``forward`` on their dequantized weight. ``restore()`` puts
    back exactly what was there, in reverse order, so nested uses (an island inside a float32
    reference run) unwind correctly. ``Unsupported`` before any change for a layer it cannot handle.
    Inputs are the caller's to cast to float32 (``casting.Float32Island`` and ``float32_call`` do).
    """

    def __init__(self, module: nn.Module, name: str = "") -> None:
        layers = quantized_layers(module)
        for layer_name, layer, layer_kind in layers:
            qualified = ".".join(filter(None, [name, layer_name])) or f"a {type(layer).__name__}"
            _check_float32_capable(qualified, layer, layer_kind)
        self._undo: list[Callable[[], None]] = []
        for _, layer, layer_kind in layers:
            self._switch(layer, layer_kind)

    def _switch(self, layer: nn.Module, layer_kind: str) -> None:
        if layer_kind == "gguf":
            self._set(layer, "compute_dtype", torch.float32)
        elif layer_kind == "layerwise casting":
            self._set(layerwise_casting_hook(layer), "compute_dtype", torch.float32)
        else:
            previous = layer.__dict__.get("forward", _ABSENT)
            layer.forward = _float32_forward(layer, layer_kind)
            self._undo.append(functools.partial(_put_back, layer, "forward", previous))

    def _set(self, owner: Any, attr: str, value: Any) -> None:
        previous = owner.__dict__.get(attr, _ABSENT)
        setattr(owner, attr, value)
        self._undo.append(functools.partial(_put_back, owner, attr, previous))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


_ABSENT = object()


def _put_back(owner: Any, attr: str, previous: Any) -> None:
    if previous is _ABSENT:
        owner.__dict__.pop(attr, None)
    else:
        setattr(owner, attr, previous)
