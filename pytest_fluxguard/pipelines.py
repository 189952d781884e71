"""Pipelines loaded once and shared by every item and test of a session.

One FluxFillPipeline is loaded per (folder, variant, dtype); its guarded twin and its detect-only
twin (a guard with no strategies, which raises at the first overflow) wrap the very same modules,
so neither costs memory. The guard's fixes persist until ``guard.reset()``,
which restores the weights bit for bit: every hand-out resets them, so each test starts from the
saved weights and a raw pipeline never runs with a fix a guarded run left behind. Only the most
recently used weights stay loaded (a model and its float32 reference), since a full-size Flux Fill
in three dtypes would not fit in memory.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

from guarded_diffusers import resolve_device

from .options import DTYPES


def dtype_name(dtype: Any) -> str:
    """``"float16"`` for ``torch.float16`` or ``"float16"``; a ValueError for anything else."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return name


@dataclasses.dataclass
class _Loaded:
    raw: Any
    guarded: Any = None
    detecting: Any = None


class PipelineCache:
    """Loads pipelines on first use and keeps the ``capacity`` most recently used weight sets."""

    def __init__(self, device: str = "auto", capacity: int = 2) -> None:
        self._device = device
        self._capacity = capacity
        self._loaded: collections.OrderedDict[tuple[Path, str | None, str], _Loaded] = (
            collections.OrderedDict()
        )

    def get(
        self, path: str | Path, variant: str | None = None, dtype: Any = "float16", guarded: bool = False
    ) -> Any:
        """The FluxFillPipeline (or, with ``guarded``, GuardedFluxFillPipeline) for these weights."""
        loaded = self._load(Path(path).resolve(), variant, dtype_name(dtype))
        if loaded.guarded is not None:
            loaded.guarded.guard.reset()
        if not guarded:
            return loaded.raw
        if loaded.guarded is None:
            from guarded_diffusers import GuardedFluxFillPipeline

            loaded.guarded = GuardedFluxFillPipeline(**loaded.raw.components)
            loaded.guarded.set_progress_bar_config(disable=True)
        return loaded.guarded

    def detecting(self, path: str | Path, variant: str | None = None, dtype: Any = "float16") -> Any:
        """The raw pipeline's weights behind a guard that only detects (``guard_strategies=[]``).

        It raises ``NonFiniteError`` at the first stage that overflows (NaN, inf, or a residual
        stream at the dtype's maximum, where diffusers and transformers clip) and otherwise
        returns the raw pipeline's pixels bit for bit: its checks only read the tensors.
        """
        loaded = self._load(Path(path).resolve(), variant, dtype_name(dtype))
        if loaded.guarded is not None:
            loaded.guarded.guard.reset()
        if loaded.detecting is None:
            from guarded_diffusers import GuardedFluxFillPipeline

            loaded.detecting = GuardedFluxFillPipeline.from_pipe(loaded.raw, guard_strategies=[])
            loaded.detecting.set_progress_bar_config(disable=True)
        return loaded.detecting

    def _load(self, path: Path, variant: str | None, dtype: str) -> _Loaded:
        key = (path, variant, dtype)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        import torch
        from diffusers import FluxFillPipeline

        raw = FluxFillPipeline.from_pretrained(path, variant=variant, dtype=getattr(torch, dtype))
        raw.to(resolve_device(self._device))
        raw.set_progress_bar_config(disable=True)
        self._loaded[key] = _Loaded(raw)
        while len(self._loaded) > self._capacity:
            self._loaded.popitem(last=False)
        return self._loaded[key]

    def clear(self) -> None:
        """Drop every pipeline, at the end of the session."""
        self._loaded.clear()
