"""No forward runs through a guarded component while a fix changes weights.

Components are shared by reference between pipelines and served from several threads. A float32
island, a rescale shift and the guard's own float32 reference runs change tensors one by one; a
forward through the module meanwhile would see it half converted (mixed dtypes raise, mixed
values are silently wrong), and a kernel can be reading a storage that a dtype change frees. So
each component a guard watches counts the forwards running through it (``admit``), and the guard
changes weights only inside ``exclusive()``: it waits until no other thread is in a forward, and
forwards of other threads wait at the component's door until it is done. The thread holding the
gate passes (the guard recomputes the stage while it holds it); a forward's output never
depends on the gate, only when it runs.

One gate serves every component in the process: fixes are rare, and one lock cannot deadlock
with another.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .compiled import eager_module


class _Gate:
    """Forwards (shared, re-entrant per thread) and one weight change at a time (exclusive)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._forwards: dict[int, int] = {}  # thread -> forwards it is in
        self._writer: int | None = None
        self._depth = 0
        self._waiting: set[int] = set()  # threads waiting for the exclusive hold

    def enter(self) -> None:
        me = threading.get_ident()
        with self._condition:
            if self._writer != me and not self._forwards.get(me):
                self._condition.wait_for(lambda: self._writer is None and not self._waiting)
            self._forwards[me] = self._forwards.get(me, 0) + 1

    def leave(self) -> None:
        me = threading.get_ident()
        with self._condition:
            count = self._forwards.pop(me, 0) - 1
            if count > 0:
                self._forwards[me] = count
            self._condition.notify_all()

    def _free_for(self, me: int) -> bool:
        """No writer, and every thread in a forward is ``me`` or waiting to write (so not running)."""
        return self._writer is None and all(t == me or t in self._waiting for t in self._forwards)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            if self._writer != me:
                self._waiting.add(me)
                try:
                    self._condition.wait_for(lambda: self._free_for(me))
                finally:
                    self._waiting.discard(me)
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._condition.notify_all()


_GATE = _Gate()


def exclusive() -> contextlib.AbstractContextManager[None]:
    """Hold the gate: wait for other threads' forwards to finish, keep new ones out until done."""
    return _GATE.exclusive()


class _Counted:
    """A module's call counted at the gate, as ``module._compiled_call_impl``: ``nn.Module.__call__``
    runs it instead of ``_call_impl``, so it encloses every hook of the module and, unlike a pair of
    hooks, leaves the gate however the forward ends. A deep copy of the module counts its own calls."""

    def __init__(self, call: Any) -> None:
        self.gated_call = call  # the module's ``_call_impl``, or the call compiled in place

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced into compiled code: a lock cannot be traced
            return self.gated_call(*args, **kwargs)
        _GATE.enter()
        try:
            return self.gated_call(*args, **kwargs)
        finally:
            _GATE.leave()


def admit(module: nn.Module) -> None:
    """Count ``module``'s forwards at the gate from now on (idempotent): the module's own, and for
    ``torch.compile``'s wrapper the wrapper's too, around the compiled code; a module compiled in
    place since it was admitted is counted again around its new compiled call."""
    for target in {eager_module(module), module}:
        current = getattr(target, "_compiled_call_impl", None)
        if getattr(current, "gated_call", None) is None:
            target._compiled_call_impl = _Counted(current if current is not None else target._call_impl)
