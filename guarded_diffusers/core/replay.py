"""Re-running a call with the very inputs it got, also when the call updates them in place.

Some components fill containers they are given: the causal 3D VAEs of QwenImage and Wan pass a
feature cache (a list) and its cursor (a one-element list) to their encoder and decoder, which
store each causal convolution's last frames in the cache and advance the cursor, and the caller
reads both afterwards. A re-run from the containers as the call left them reads past the cache. So
the guard records the contents of every list and dict among a stage call's arguments before the
call runs, and puts them back before each re-run: each re-run starts where the call started, and
the last one leaves the containers as a plain call would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class ArgumentState:
    """The contents of the lists and dicts among a call's arguments, as they were when it was taken."""

    contents: tuple[tuple[list | dict, list | dict], ...] = ()

    @classmethod
    def take(cls, args: tuple, kwargs: dict) -> ArgumentState:
        contents: list[tuple[list | dict, list | dict]] = []
        pending: list[Any] = [*args, *kwargs.values()]
        while pending:
            item = pending.pop()
            if isinstance(item, torch.Tensor):
                continue
            if isinstance(item, list | dict):
                contents.append((item, item.copy()))
            if isinstance(item, list | tuple):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item.values())
        return cls(tuple(contents))

    def restore(self) -> None:
        """Put every recorded container's contents back, in place (the caller holds the same objects)."""
        for container, saved in self.contents:
            if isinstance(container, list):
                container[:] = saved
            else:
                container.clear()
                container.update(saved)
