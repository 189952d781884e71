"""Upcast: run the smallest enclosing module whose float32 output fits the working dtype in float32.

Starting at the module that overflowed, each enclosing call is re-run alone in float32 on the
inputs it had; the first whose output fits back into its caller's dtype (with headroom for
later steps) becomes a float32 island, and everything else keeps running in float16. If the
search reaches the component itself, the whole component is upcast and the guard's recompute
decides whether that is enough.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..casting import Float32Island
from ..checks import host_absmax
from ..hookspecs import hookimpl
from ..locate import Location
from ..recovery import ModuleLookup

# An island's float32 output must fit under the caller dtype's maximum divided by this, so that
# the next denoising steps, with other inputs, do not overflow at its boundary.
FIT_HEADROOM = 2.0


@dataclasses.dataclass(eq=False)
class UpcastFix:
    """A float32 island on ``module_name``; ``revert()`` restores the original dtypes exactly."""

    module_name: str
    island: Float32Island
    output_absmax: float | None
    strategy: str = "upcast"

    def revert(self) -> None:
        self.island.revert()

    def describe(self) -> dict[str, Any]:
        return {"dtype": "float32", "output_absmax": self.output_absmax}


def _fits(peak: float, dtype: torch.dtype) -> bool:
    return math.isfinite(peak) and peak <= torch.finfo(dtype).max / FIT_HEADROOM


class UpcastStrategy:
    """Escalates from the overflowing module to its parents until a float32 island fits."""

    name = "upcast"

    def recover(self, location: Location) -> UpcastFix | None:
        *enclosing, component = location.calls
        for depth, call in enumerate(enclosing):
            island = Float32Island(call.module)
            try:
                # The diagnosis already measured the overflowing module itself in float32.
                peak = (
                    location.absmax
                    if depth == 0 and location.absmax is not None
                    else host_absmax(call.in_float32())
                )
            except BaseException:
                island.revert()
                raise
            caller_dtype = call.input_dtype or island.original_dtype
            if caller_dtype is not None and _fits(peak, caller_dtype):
                return UpcastFix(call.name, island, peak)
            island.revert()
        return UpcastFix(component.name, Float32Island(component.module), None)

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> UpcastFix:
        if params.get("dtype", "float32") != "float32":
            raise ValueError(f"upcast only makes float32 islands, not {params['dtype']!r}.")
        return UpcastFix(module_name, Float32Island(modules(module_name)), params.get("output_absmax"))


@hookimpl
def register_strategies(register: Any) -> None:
    register(UpcastStrategy())
