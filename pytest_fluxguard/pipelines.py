"""Pipelines loaded once and shared by every item and test of a session.

One pipeline, of the class the folder's model_index.json names, is loaded per (folder, variant,
dtype); its guarded twin and its detect-only twin (a guard with no strategies, which raises at the
first overflow) wrap the very same modules, so neither costs memory. The guard's fixes persist
until ``guard.reset()``, which restores the weights bit for bit: every hand-out resets them, so
each test starts from the saved weights and a raw pipeline never runs with a fix a guarded run
left behind. Only the most recently used weights stay loaded (a model and its float32 reference),
since a full-size Flux model in three dtypes would not fit in memory. A LoRA is loaded onto the
weights it is asked with and unloaded when other weights' LoRA (or none) is asked for: the base
model loads once per dtype.
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


class LoRAUnavailable(Exception):
    """A LoRA was asked for and cannot be loaded (peft missing, or the weights do not fit the model)."""


@dataclasses.dataclass
class _Loaded:
    raw: Any
    guarded: Any = None
    detecting: Any = None
    lora: Path | None = None


class PipelineCache:
    """Loads pipelines on first use and keeps the ``capacity`` most recently used weight sets."""

    def __init__(self, device: str = "auto", capacity: int = 2) -> None:
        self._device = device
        self._capacity = capacity
        self._loaded: collections.OrderedDict[tuple[Path, str | None, str], _Loaded] = (
            collections.OrderedDict()
        )

    def get(
        self,
        path: str | Path,
        variant: str | None = None,
        dtype: Any = "float16",
        guarded: bool = False,
        lora: str | Path | None = None,
    ) -> Any:
        """The folder's pipeline (or, with ``guarded``, its guarded twin, e.g. GuardedFluxFillPipeline)
        for these weights, with ``lora`` loaded (``pipe.load_lora_weights``) or none."""
        loaded = self._load(Path(path).resolve(), variant, dtype_name(dtype), lora)
        if not guarded:
            return loaded.raw
        if loaded.guarded is None:
            loaded.guarded = _guarded_twin(loaded.raw)
        return loaded.guarded

    def detecting(
        self,
        path: str | Path,
        variant: str | None = None,
        dtype: Any = "float16",
        lora: str | Path | None = None,
    ) -> Any:
        """The raw pipeline's weights behind a guard that only detects (``guard_strategies=[]``).

        It raises ``NonFiniteError`` at the first stage that overflows (NaN, inf, or a residual
        stream at the dtype's maximum, where diffusers and transformers clip) and otherwise
        returns the raw pipeline's pixels bit for bit: its checks only read the tensors.
        """
        loaded = self._load(Path(path).resolve(), variant, dtype_name(dtype), lora)
        if loaded.detecting is None:
            loaded.detecting = _guarded_twin(loaded.raw, strategies=[])
        return loaded.detecting

    def _load(self, path: Path, variant: str | None, dtype: str, lora: str | Path | None) -> _Loaded:
        key = (path, variant, dtype)
        loaded = self._loaded.get(key)
        if loaded is None:
            import torch
            from diffusers import DiffusionPipeline

            raw = DiffusionPipeline.from_pretrained(path, variant=variant, dtype=getattr(torch, dtype))
            raw.to(resolve_device(self._device))
            raw.set_progress_bar_config(disable=True)
            loaded = self._loaded[key] = _Loaded(raw)
            while len(self._loaded) > self._capacity:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        if loaded.guarded is not None:
            loaded.guarded.guard.reset()
        if loaded.detecting is not None:
            loaded.detecting.guard.reset()
        _swap_lora(loaded, Path(lora).resolve() if lora is not None else None)
        return loaded

    def clear(self) -> None:
        """Drop every pipeline, at the end of the session."""
        self._loaded.clear()


def _guarded_twin(raw: Any, strategies: list[str] | None = None) -> Any:
    """A pipeline of ``raw``'s class on its very modules, guarded in place (``guard``).

    Not ``from_pipe``: it casts every module to one dtype, T5's float32 ``wo`` included.
    """
    from guarded_diffusers import guard

    twin = guard(type(raw)(**raw.components), strategies=strategies)
    twin.set_progress_bar_config(disable=True)
    return twin


def _swap_lora(loaded: _Loaded, lora: Path | None) -> None:
    """Unload the LoRA ``loaded`` holds and load ``lora``; the guard wrappers are made anew after."""
    if loaded.lora == lora:
        return
    if loaded.lora is not None:
        loaded.raw.unload_lora_weights()
        loaded.lora = None
    loaded.guarded = loaded.detecting = None  # their guards watched the modules the LoRA replaced
    if lora is None:
        return
    try:
        import peft  # noqa: F401  (diffusers needs it for load_lora_weights)
    except ImportError:
        raise LoRAUnavailable("--fluxguard-lora needs peft: pip install peft") from None
    try:
        if lora.is_file():
            loaded.raw.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            loaded.raw.load_lora_weights(str(lora))
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise LoRAUnavailable(f"{lora} does not load onto this model: {error}") from None
    loaded.lora = lora
