"""What a strategy may leave behind when it fails: hooks and dtypes, recorded and put back.

Before each attempt the guard records every module's hook ids and every tensor's dtype in the
failing component; after a failed attempt (a strategy that raised, returned something that is
not a ``Fix``, or whose fix was reverted) it removes hooks that were not there and casts tensors
back to their recorded dtype, so the next strategy starts from the state the first one saw.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .casting import floating_state, set_tensor_dtype

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
# Per-hook flags torch keeps next to the hook dicts; cleared with the hook.
_HOOK_FLAG_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


@dataclasses.dataclass(frozen=True)
class StructureSnapshot:
    """Hook ids per module and dtype per floating tensor of one component."""

    component: nn.Module
    hooks: dict[str, tuple[nn.Module, dict[str, frozenset[int]]]]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def take(cls, component: nn.Module) -> StructureSnapshot:
        hooks = {
            name: (module, {attr: frozenset(getattr(module, attr)) for attr in _HOOK_DICTS})
            for name, module in component.named_modules()
        }
        return cls(component, hooks, _floating_dtypes(component))

    def restore(self) -> list[str]:
        """Undo hook and dtype changes made since ``take``; returns what was put back, for the report."""
        restored = []
        for name, (module, before) in self.hooks.items():
            for attr, ids in before.items():
                for hook_id in set(getattr(module, attr)) - ids:
                    getattr(module, attr).pop(hook_id)
                    for flags in _HOOK_FLAG_DICTS:
                        getattr(module, flags, {}).pop(hook_id, None)
                    restored.append(f"removed a hook left on {name or 'the component'}")
        for name, dtype in _floating_dtypes(self.component).items():
            if name in self.dtypes and dtype != self.dtypes[name]:
                set_tensor_dtype(self.component, name, self.dtypes[name])
                restored.append(f"cast {name} back to {self.dtypes[name]}")
        return restored


def _floating_dtypes(component: nn.Module) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, tensor in floating_state(component).items()}


@dataclasses.dataclass(frozen=True)
class _SavedTensor:
    owner: nn.Module
    kind: str  # "_parameters" or "_buffers"
    attr: str
    tensor: torch.Tensor
    copy: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ValueSnapshot:
    """Every floating parameter and buffer of some modules: the objects and a host copy of their values.

    Hooks and dtypes are not enough to undo a plan entry whose ``apply`` changed weights in place
    and then raised: its fix never existed, so no ``revert()`` can run. Copies go to the host, so
    taking one costs no accelerator memory.
    """

    saved: tuple[_SavedTensor, ...]

    @classmethod
    def take(cls, modules: list[nn.Module]) -> ValueSnapshot:
        saved, seen = [], set()
        for module in modules:
            for owner in module.modules():
                if id(owner) in seen:
                    continue
                seen.add(id(owner))
                for kind in ("_parameters", "_buffers"):
                    for attr, tensor in getattr(owner, kind).items():
                        if tensor is not None and tensor.is_floating_point() and not tensor.is_meta:
                            copy = tensor.detach().to("cpu", copy=True)
                            saved.append(_SavedTensor(owner, kind, attr, tensor, copy))
        return cls(tuple(saved))

    @torch.no_grad()
    def restore(self) -> None:
        """Put each original tensor object back in its module, with its dtype and values bit for bit."""
        for item in self.saved:
            getattr(item.owner, item.kind)[item.attr] = item.tensor
            if item.tensor.dtype == item.copy.dtype and item.tensor.shape == item.copy.shape:
                item.tensor.copy_(item.copy)
            else:
                item.tensor.data = item.copy.to(item.tensor.device)
