"""Clamp: saturate the overflowing module's output inside the working dtype's range.

The cheapest fix: no extra memory, one elementwise pass over that module's output per call. It
changes the values it saturates, so fidelity depends on how much the model relies on them; NaN
is never passed on (it becomes 0), unlike a plain ``clamp``, which lets NaN through.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core.casting import module_dtype
from ..core.context import in_guarded_call
from ..core.hookspecs import hookimpl
from ..core.locate import Location
from ..core.plan import check_keys, is_real
from ..core.recovery import ModuleLookup
from .hooks import HookFix

# Saturate at this fraction of the dtype's maximum, leaving room for the residual additions
# and products that follow the module.
DEFAULT_MARGIN = 0.5


def saturate(tree: Any, limit: float) -> Any:
    """``tree`` with floating tensors clamped to [-limit, limit], inf saturated and NaN set to 0."""

    def one(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        return torch.nan_to_num(tensor, nan=0.0, posinf=limit, neginf=-limit).clamp_(-limit, limit)

    return pytree.tree_map_only(torch.Tensor, one, tree)


@dataclasses.dataclass(eq=False)
class ClampFix(HookFix):
    """A forward hook saturating ``module_name``'s output at ``+-limit``; ``revert()`` removes it."""

    limit: float
    strategy: str = "clamp"

    def describe(self) -> dict[str, Any]:
        return {"limit": self.limit}


def _clamp(module_name: str, module: nn.Module, limit: float) -> ClampFix:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        # Only in guarded calls: a plain pipeline sharing the module keeps diffusers' numbers.
        return saturate(output, limit) if in_guarded_call() else None

    handle = module.register_forward_hook(hook)
    return ClampFix(module_name, [handle], limit)


class ClampStrategy:
    """Saturates the first non-finite module's output at ``+-(dtype max x margin)``."""

    name = "clamp"

    def __init__(self, margin: float = DEFAULT_MARGIN) -> None:
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"`margin` must be in (0, 1], got {margin}.")
        self.margin = margin

    def recover(self, location: Location) -> ClampFix | None:
        call = location.calls[0]
        dtype = call.input_dtype or module_dtype(call.module)
        # Non-finite even in float32 (a NaN weight or input) is not a range overflow: zeroing it
        # would hide a broken model behind a finite image.
        if dtype is None or (location.absmax is not None and not math.isfinite(location.absmax)):
            return None
        return _clamp(call.name, call.module, torch.finfo(dtype).max * self.margin)

    def validate(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> None:
        """Check a plan entry, changing nothing: a real limit (not a bool) inside the module's dtype."""
        check_keys(params, required=("limit",))
        module = modules(module_name)
        dtype = module_dtype(module) or module_dtype(modules(module_name.partition(".")[0])) or torch.float32
        top = torch.finfo(dtype).max
        limit = params["limit"]
        if not (is_real(limit) and 0 < limit <= top):
            raise ValueError(
                f"clamp needs a positive finite `limit` no larger than {top:g} ({dtype}'s maximum), "
                f"not {reprlib.repr(limit)}."
            )

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> ClampFix:
        self.validate(module_name, params, modules)
        return _clamp(module_name, modules(module_name), float(params["limit"]))


@hookimpl
def register_strategies(register: Any) -> None:
    register(ClampStrategy())
