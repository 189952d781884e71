"""Reversible float32 islands inside a lower-precision model.

A module is converted in place to float32 and wrapped with hooks that cast its floating
inputs to float32 and its outputs back to the caller's dtype, so the rest of the model keeps
running in its working dtype. Converting float16 or bfloat16 to float32 and back is exact, so
``revert()`` restores every parameter and buffer bit for bit, in its own original dtype.

Weights a quantization library manages (GGUF, torchao, quanto, bitsandbytes, diffusers' layerwise
casting) are never converted: their layers are switched to float32 compute instead
(``quantized.Float32Compute``), and switched back just as exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .checks import floating_tensors
from .gate import exclusive
from .quantized import Float32Compute, compute_dtype, managed_tensor_ids, quantized_layers


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """``tree`` with every floating tensor cast to ``dtype``; other leaves untouched."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The floating parameters and buffers the guard may convert: those no quantization library manages."""
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    managed = managed_tensor_ids(module)
    return {
        name: tensor
        for name, tensor in state.items()
        if tensor.is_floating_point() and id(tensor) not in managed
    }


def tensor_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of every parameter and buffer of ``modules``, each tensor counted once (ties, shared)."""
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def float32_extra_bytes(module: nn.Module) -> int:
    """Bytes a float32 island on ``module`` would add: each narrower floating tensor widened to 4 bytes."""
    return sum(
        t.numel() * (4 - t.element_size()) for t in floating_state(module).values() if t.element_size() < 4
    )


def module_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating parameter or buffer, as diffusers and transformers report it;
    for a module whose weights a quantization library manages, the dtype its first layer computes in."""
    dtype = next(iter(t.dtype for t in floating_state(module).values()), None)
    if dtype is None:
        dtype = next((d for _, layer, _ in quantized_layers(module) if (d := compute_dtype(layer))), None)
    return dtype


def set_tensor_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Convert one parameter or buffer in place, keeping the Parameter object (and its ties)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr].data = owner._parameters[attr].data.to(dtype)
    else:
        owner._buffers[attr] = owner._buffers[attr].to(dtype)


def cast_keeping_float32(module: nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)``, except the tensors transformers keeps in float32 when it loads at ``dtype``."""
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if not keep:
        module.to(dtype=dtype)
        return
    kept = re.compile("|".join(pattern.replace("*", ".*") for pattern in keep))
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            set_tensor_dtype(module, name, torch.float32 if kept.search(name) else dtype)


class Float32Island:
    """Runs ``module`` in float32 while its callers keep their dtype; ``revert()`` undoes it exactly."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self.module = module
        self.original_dtypes = {name: t.dtype for name, t in floating_state(module).items()}
        self.original_dtype = module_dtype(module)
        self._caller_dtypes: list[torch.dtype | None] = []
        with exclusive():  # no other thread's forward sees the module half converted
            # Quantized layers compute in float32 without a converted weight; ``Unsupported`` (a
            # ValueError naming the layer) before anything changes if one of them cannot.
            self._compute = Float32Compute(module, name)
            for tensor_name, dtype in self.original_dtypes.items():
                if dtype != torch.float32:
                    set_tensor_dtype(module, tensor_name, torch.float32)
            self._handles = [
                module.register_forward_pre_hook(self._enter, with_kwargs=True),
                module.register_forward_hook(self._leave, with_kwargs=True, always_call=True),
            ]

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        inputs = floating_tensors((args, kwargs))
        self._caller_dtypes.append(inputs[0].dtype if inputs else self.original_dtype)
        return cast_floating(args, torch.float32), cast_floating(kwargs, torch.float32)

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        caller_dtype = self._caller_dtypes.pop() if self._caller_dtypes else None
        if caller_dtype is None or output is None:
            return None
        return cast_floating(output, caller_dtype)

    def revert(self) -> None:
        """Remove the hooks and return every tensor to its original dtype, bit for bit."""
        with exclusive():
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._compute.restore()
            for name, dtype in self.original_dtypes.items():
                if dtype != torch.float32:
                    set_tensor_dtype(self.module, name, dtype)

    def extra_bytes(self) -> int:
        """Parameter and buffer memory this island adds over the original dtypes."""
        state = floating_state(self.module)
        return sum(
            state[name].numel() * (state[name].element_size() - torch.empty((), dtype=dtype).element_size())
            for name, dtype in self.original_dtypes.items()
        )


class _Widened:
    """Float32 copies of some tensors of a module for the duration of its call; put back exactly."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.dtypes = {name: t.dtype for name, t in tensors.items() if t.dtype != torch.float32}
        self.depth = 0

    def enter(self, *_: Any) -> None:
        self.depth += 1
        if self.depth == 1:
            for name in self.dtypes:
                set_tensor_dtype(self.module, name, torch.float32)

    def leave(self, *_: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            for name, dtype in self.dtypes.items():
                set_tensor_dtype(self.module, name, dtype)


def _plan_widening(module: nn.Module, budget: int) -> list[_Widened]:
    """Whole subtrees that fit ``budget`` in float32 at once; larger modules only their own tensors.

    A ``ModuleList`` or ``ModuleDict`` is never called (its items are: ``attn.to_out[0]``), so its
    items are widened one by one, however small the container.
    """
    if float32_extra_bytes(module) <= budget and not isinstance(module, nn.ModuleList | nn.ModuleDict):
        return [_Widened(module, floating_state(module))]
    managed = managed_tensor_ids(module)
    own = {
        name: t
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if t.is_floating_point() and id(t) not in managed
    }
    plans = [_Widened(module, own)] if own else []
    for child in module.children():
        plans += _plan_widening(child, budget)
    return plans


def float32_call(
    module: nn.Module, args: tuple, kwargs: dict, budget: int | None = None, name: str = ""
) -> Any:
    """``module(*args, **kwargs)`` computed in float32, holding at most ~``budget`` extra bytes at a time.

    The module's own dtypes are restored exactly afterwards. Without a budget, or when the module
    fits it, the whole module is widened for the call; otherwise each submodule is widened only
    while it runs (the largest subtrees that fit at once), so a float32 reference of a whole
    component costs one block's worth of memory, not the component's. Quantized layers compute in
    float32 from their dequantized weights for the call (``quantized.Float32Compute``);
    ``quantized.Unsupported`` (naming it under ``name``, the module's qualified name) for one that
    cannot.
    """
    plans = _plan_widening(module, budget if budget is not None else float32_extra_bytes(module))
    handles = []
    with exclusive():  # widened in place: no other thread's forward may run through it meanwhile
        compute = Float32Compute(module, name)
        try:
            for plan in plans:
                # First in line, so hooks already there (a fix's dtype adapters) see the float32 weights.
                handles.append(plan.module.register_forward_pre_hook(plan.enter, prepend=True))
                handles.append(plan.module.register_forward_hook(plan.leave, always_call=True))
            return module(*cast_floating(args, torch.float32), **cast_floating(kwargs, torch.float32))
        finally:
            for handle in handles:
                handle.remove()
            compute.restore()
