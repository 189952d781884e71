"""Fixes made of hooks only: they change what modules compute, never a weight."""

from __future__ import annotations

import dataclasses

from torch.utils.hooks import RemovableHandle


@dataclasses.dataclass(eq=False)
class HookFix:
    """A fix whose whole change is ``handles``; ``revert()`` removes them, leaving the model as it was."""

    module_name: str
    handles: list[RemovableHandle]

    def revert(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
