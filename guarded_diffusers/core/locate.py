"""Find the first module whose output overflowed: a diagnostic re-run with per-module hooks.

The hooks exist only for the duration of one re-run of the failing component with the very
inputs it got. The re-run stops at the first module output that is non-finite (or saturated,
for a layer or a residual-stream block: see ``stream.py``), so a diagnosis costs
at most one forward, and it returns the chain of enclosing calls with their inputs so that a
strategy can re-run any of them in isolation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .casting import cast_floating, float32_call, float32_extra_bytes
from .checks import floating_tensors, host_absmax
from .compiled import eager_call, eager_module
from .context import owned_by_this_thread
from .quantized import quantized_layers
from .stream import overflow_kind


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """One call of a module during the diagnosis: its qualified name and a copy of its inputs."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    # Which call of ``module`` this was within the component's forward (0 for the first): a
    # module may run several times per forward (Flux's ``time_proj`` embeds timestep, then guidance).
    occurrence: int = 0

    def __call__(self) -> Any:
        return self.module(*self.args, **self.kwargs)

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The dtype the module was called with: its first floating input's."""
        inputs = floating_tensors((self.args, self.kwargs))
        return inputs[0].dtype if inputs else None

    def in_float32(self) -> Any:
        """Call the module with its inputs cast to float32 (the module's own dtype is unchanged)."""
        return self.module(
            *cast_floating(self.args, torch.float32), **cast_floating(self.kwargs, torch.float32)
        )


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a stage first went non-finite: the calls from that module out to the component."""

    calls: tuple[ModuleCall, ...]
    absmax: float | None
    # "non-finite" (inf or NaN) or "saturated" (finite, at the dtype's maximum, where libraries clip).
    kind: str = "non-finite"
    # Bytes a fix may still add within the guard's memory budget (``None``: no limit). Strategies
    # that trade memory for fidelity consult it, so they decline instead of making a fix over it.
    memory_budget: int | None = None

    @property
    def module_name(self) -> str:
        return self.calls[0].name


class _FirstNonFinite(Exception):
    """Stops the diagnostic forward at the first overflowing module output."""


def _detached_copy(tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)


def float32_output(call: ModuleCall, budget: int | None = None) -> Any:
    """``call``'s output with its module run in float32 for this call only.

    A module that fits ``budget`` in float32 runs as a float32 copy without hooks (the model in
    float32, no fix), so the shared module itself never changes and a concurrent forward through
    it from another thread is undisturbed. Larger modules, offloaded or quantized ones are widened
    in place, piece by piece (``casting.float32_call``), and restored exactly after.
    """
    if _copyable(call.module) and (budget is None or float32_extra_bytes(call.module) <= budget):
        replica = copy.deepcopy(call.module).float()
        for module in replica.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                hooks.clear()
        return replica(*cast_floating(call.args, torch.float32), **cast_floating(call.kwargs, torch.float32))
    return float32_call(call.module, call.args, call.kwargs, budget, call.name)


def _copyable(module: nn.Module) -> bool:
    """Plain tensors on a real device, no accelerate or diffusers hook, no quantized layer (diffusers'
    layerwise casting keeps plain float8 tensors): a float32 copy computes what it would."""
    tensors = [*module.parameters(), *module.buffers()]
    plain = all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" for t in tensors)
    hooked = any(hasattr(m, "_hf_hook") or "_diffusers_hook" in m.__dict__ for m in module.modules())
    return plain and not hooked and not quantized_layers(module)


def float32_absmax(call: ModuleCall) -> float:
    """The largest magnitude ``call``'s output reaches when its module runs in float32."""
    return host_absmax(float32_output(call))


def locate_first_overflow(
    component: nn.Module, component_name: str, args: tuple, kwargs: dict, blocks: Collection[nn.Module] = ()
) -> Location | None:
    """Re-run ``component(*args, **kwargs)`` with hooks; stop at the first module whose output is
    non-finite, or saturated for a layer or one of ``blocks``; ``None`` if nothing overflows."""
    names = {
        module: f"{component_name}.{name}" if name else component_name
        for name, module in eager_module(component).named_modules()
    }
    active: list[ModuleCall] = []
    found: list[ModuleCall] = []
    kinds: list[str] = []
    ours = owned_by_this_thread()
    calls_so_far: dict[nn.Module, int] = {}

    def enter(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        if not ours():
            return  # another thread running through a shared module meanwhile
        occurrence = calls_so_far.get(module, 0)
        calls_so_far[module] = occurrence + 1
        active.append(
            ModuleCall(
                names[module], module, _detached_copy(call_args), _detached_copy(call_kwargs), occurrence
            )
        )

    def leave(module: nn.Module, call_args: tuple, call_kwargs: dict, output: Any) -> None:
        if not ours():
            return
        call = active.pop()
        kind = overflow_kind(module, output, blocks)
        if kind is not None:
            found.extend([call, *reversed(active)])
            kinds.append(kind)
            raise _FirstNonFinite

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(leave, with_kwargs=True))
        with contextlib.suppress(_FirstNonFinite):
            eager_call(component, args, kwargs)  # compiled code would not run the hooks
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return None
    first = found[0]
    absmax = float32_absmax(first) if first.module not in (component, eager_module(component)) else None
    return Location(calls=tuple(found), absmax=absmax, kind=kinds[0])
