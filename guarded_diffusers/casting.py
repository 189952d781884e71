"""Reversible float32 islands inside a lower-precision model.

A module is converted in place to float32 and wrapped with hooks that cast its floating
inputs to float32 and its outputs back to the caller's dtype, so the rest of the model keeps
running in its working dtype. Converting float16 or bfloat16 to float32 and back is exact, so
``revert()`` restores every parameter and buffer bit for bit, in its own original dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .checks import floating_tensors


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """``tree`` with every floating tensor cast to ``dtype``; other leaves untouched."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    return {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}


def module_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating parameter or buffer, as diffusers and transformers report it."""
    return next(iter(t.dtype for t in floating_state(module).values()), None)


def set_tensor_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Convert one parameter or buffer in place, keeping the Parameter object (and its ties)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr].data = owner._parameters[attr].data.to(dtype)
    else:
        owner._buffers[attr] = owner._buffers[attr].to(dtype)


class Float32Island:
    """Runs ``module`` in float32 while its callers keep their dtype; ``revert()`` undoes it exactly."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.original_dtypes = {name: t.dtype for name, t in floating_state(module).items()}
        self.original_dtype = module_dtype(module)
        self._caller_dtypes: list[torch.dtype | None] = []
        for name, dtype in self.original_dtypes.items():
            if dtype != torch.float32:
                set_tensor_dtype(module, name, torch.float32)
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
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
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
