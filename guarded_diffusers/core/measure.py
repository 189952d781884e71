"""Measure a fix against float32: the region it changed, in the working dtype and in float32.

While the guard recomputes a stage with a fix in place, ``capturing`` records the inputs and
the output of every call on the located chain (from the overflowing module out to the
component), exactly as the model computed them, fix included. Then, with the fix lifted,
``measure`` runs the smallest recorded call that encloses every module the fix changed (and
more than a changed leaf layer: a layer's output matters through its consumer) in float32 on
those very inputs, and compares: relative L2 of the working-dtype output against the
float32 one. A call whose float32 output does not fit the working dtype cannot be matched by
any fix and is passed over for its caller. A call too large to convert at once within the memory
budget is computed piecewise (``casting.float32_call``). A fix that cannot be measured is
reported as unmeasured, which never counts as recovered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .checks import floating_tensors, host_absmax
from .context import owned_by_this_thread
from .fidelity import relative_l2
from .locate import ModuleCall, float32_output


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A fix's relative L2 error against float32 and the call it was measured on (``None``: unmeasured)."""

    error: float | None
    module: str | None
    detail: str = ""


def _copy(tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)


@dataclasses.dataclass
class Captured:
    """What one forward gave each call of the located chain: its inputs and its output, by name."""

    calls: dict[str, ModuleCall] = dataclasses.field(default_factory=dict)
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


class _CallRecorder:
    """Hooks on one module that copy the inputs and output of its ``call.occurrence``-th call."""

    def __init__(self, call: ModuleCall, captured: Captured) -> None:
        self.call, self.captured = call, captured
        self.started = 0
        self.open: list[int] = []  # occurrences of this module's calls still running
        self.ours = owned_by_this_thread()

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.ours():
            return  # another thread running through a shared module meanwhile
        self.open.append(self.started)
        if self.started == self.call.occurrence:
            self.captured.calls[self.call.name] = dataclasses.replace(
                self.call, args=_copy(args), kwargs=_copy(kwargs)
            )
        self.started += 1

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.ours() and self.open and self.open.pop() == self.call.occurrence:
            self.captured.outputs[self.call.name] = _copy(output)


@contextlib.contextmanager
def capturing(calls: Sequence[ModuleCall]) -> Iterator[Captured]:
    """Record, during one forward, the inputs and output of each call of ``calls``.

    The hooks are added after any a fix installed, so they see what the fixed model computed.
    """
    captured = Captured()
    handles = []
    for call in calls:
        recorder = _CallRecorder(call, captured)
        handles.append(call.module.register_forward_pre_hook(recorder.enter, with_kwargs=True))
        handles.append(call.module.register_forward_hook(recorder.leave, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def encloses(call_name: str, module_name: str) -> bool:
    """Whether ``module_name`` is ``call_name`` or one of its submodules."""
    return module_name == call_name or module_name.startswith(call_name + ".")


def measure(
    calls: Sequence[ModuleCall], captured: Captured, changed: Sequence[str], transient_budget: int | None
) -> Measurement:
    """Relative L2 error of the smallest captured call enclosing ``changed`` against float32.

    Run with the fix lifted: the float32 reference is the unfixed module on the inputs the fixed
    model gave it. ``transient_budget`` bounds the bytes a temporary float32 copy may take.
    """
    skipped = ""
    for call in calls:
        if not all(encloses(call.name, name) for name in changed):
            continue
        if call.name in changed and next(call.module.children(), None) is None:
            continue  # a changed layer matters through what consumes it: measure its caller
        recorded, output = captured.calls.get(call.name), captured.outputs.get(call.name)
        if recorded is None or output is None:
            continue
        outputs = floating_tensors(output)
        if not outputs or not math.isfinite(host_absmax(output)):
            skipped = f"{call.name} is still non-finite"
            continue
        with torch.no_grad():
            reference = float32_output(recorded, transient_budget)
        peak = host_absmax(reference)
        if not math.isfinite(peak) or peak > torch.finfo(outputs[0].dtype).max:
            skipped = f"{call.name}'s float32 output does not fit {outputs[0].dtype}"
            continue
        return Measurement(relative_l2(output, reference), call.name)
    return Measurement(None, None, skipped or "no call encloses the fix")
