"""Components under ``torch.compile``: watched from outside the compiled code, diagnosed eagerly.

``torch.compile(module)`` returns an ``OptimizedModule`` holding the eager module at ``_orig_mod``;
``module.compile()`` compiles in place (``_compiled_call_impl``), hooks included. A hook that
reads a value on the host inside compiled code breaks the graph, and hooks added or removed per
call make dynamo recompile. So the guard's stage check wraps the compiled call from outside, its
block watch stays out of compiled components, and the diagnosis and the recompute run the eager
module, whose submodules' hooks fire and whose names carry no ``_orig_mod``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

try:
    from torch._dynamo.eval_frame import OptimizedModule
except ImportError:  # pragma: no cover - torch without dynamo
    OptimizedModule = ()  # type: ignore[assignment,misc]

# The stage check: (module, args, kwargs, output) -> a replacement output, or None to keep it.
StageCheck = Callable[[nn.Module, tuple, dict, Any], Any]
# What runs before every call, with the inputs the call is about to get: (module, args, kwargs).
BeforeCall = Callable[[nn.Module, tuple, dict], None]


def compiled_call(module: nn.Module) -> Any:
    """The call ``module.compile()`` made, under the gate's counting wrapper if any; ``None`` if eager.

    The gate (``gate.admit``) sets ``_compiled_call_impl`` on every module it counts, wrapping the
    compiled call or, for an eager module, the module's own ``_call_impl``.
    """
    call = getattr(module, "_compiled_call_impl", None)
    call = getattr(call, "gated_call", call)
    return None if getattr(call, "__func__", None) is nn.Module._call_impl else call


def is_compiled(module: nn.Module) -> bool:
    return isinstance(module, OptimizedModule) or compiled_call(module) is not None


def eager_module(module: nn.Module) -> nn.Module:
    """The module whose submodules run eagerly and carry the names users know."""
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def eager_call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` without the compiled code: hooks on submodules fire."""
    if isinstance(module, OptimizedModule):
        return module._orig_mod(*args, **kwargs)
    if compiled_call(module) is not None:
        return module._call_impl(*args, **kwargs)
    return module(*args, **kwargs)


class _CompiledCallWatch:
    """Wraps an in-place compiled module's ``_compiled_call_impl`` with the check; ``remove()`` undoes it."""

    def __init__(self, module: nn.Module, check: StageCheck, before: BeforeCall) -> None:
        self.module, self.compiled = module, module._compiled_call_impl

        def checked(*args: Any, **kwargs: Any) -> Any:
            before(module, args, kwargs)
            output = self.compiled(*args, **kwargs)
            replaced = check(module, args, kwargs, output)
            return output if replaced is None else replaced

        module._compiled_call_impl = checked

    def remove(self) -> None:
        self.module._compiled_call_impl = self.compiled


class _Handles:
    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()


def watch_calls(module: nn.Module, check: StageCheck, before: BeforeCall) -> Any:
    """Run ``before`` and ``check`` around every call of ``module``, outside any compiled code;
    returns a handle."""
    if compiled_call(module) is not None:
        return _CompiledCallWatch(module, check, before)
    # An OptimizedModule runs its own forward hooks eagerly, around the compiled forward.
    return _Handles(
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(check, with_kwargs=True),
    )
