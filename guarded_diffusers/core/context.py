"""Which guarded call, if any, the current thread is in.

Components are shared by reference between pipelines (``from_pipe``, ``Pipeline(**components)``)
and served from several threads, so a hook on a shared module fires for every caller. Every hook
the guard installs asks this module first and does nothing for calls that are not its own: a
plain pipeline sharing the modules keeps diffusers' behaviour bit for bit. Context variables are
per thread (and per asyncio task), so concurrent calls never see each other's state.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("guarded_diffusers_call", default=None)


def current_call() -> Any:
    """The state of the guarded pipeline call this thread is in, or ``None``."""
    return _CURRENT.get()


def in_guarded_call() -> bool:
    """Whether this thread is inside any guarded pipeline call (hook-only fixes act only there)."""
    return _CURRENT.get() is not None


@contextlib.contextmanager
def entering(state: Any) -> Iterator[None]:
    """Mark this thread as inside the guarded call ``state`` for the duration of the block."""
    token = _CURRENT.set(state)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def owned_by_this_thread() -> Any:
    """A predicate true only in the thread that called this: for a diagnosis' temporary hooks."""
    owner = threading.get_ident()
    return lambda: threading.get_ident() == owner
