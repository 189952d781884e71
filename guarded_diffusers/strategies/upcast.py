"""Upcast: run the smallest enclosing module whose float32 output fits the working dtype in float32.

Starting at the module that overflowed, each enclosing call is re-run alone in float32 on the
inputs it had; the first whose output fits back into its caller's dtype (with headroom for
later steps) becomes a float32 island, and everything else keeps running in float16. If the
search reaches the component itself, the whole component is upcast and the guard's recompute
decides whether that is enough. An island the guard's memory budget cannot hold is never made:
the strategy declines, and cheaper strategies try.

Quantized layers inside an island (GGUF, torchao, quanto, bitsandbytes, diffusers' layerwise
casting) compute in float32 from their dequantized weights, their stored weights untouched
(``quantized.Float32Compute``); a layer the guard does not know how to compute in float32 makes
the strategy decline, naming it. So does group offloading that reloads the component's weights
from disk or pinned copies at every forward (``offload.reloading_blocker``): it would undo the island.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping
from typing import Any

import torch

from ..core.casting import Float32Island, float32_extra_bytes
from ..core.checks import host_absmax
from ..core.hookspecs import hookimpl
from ..core.locate import Location
from ..core.offload import reloading_blocker
from ..core.plan import check_keys, is_real
from ..core.quantized import Unsupported
from ..core.recovery import Declined, ModuleLookup

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


def _check_affordable(name: str, module: torch.nn.Module, location: Location) -> None:
    """Decline before converting anything when a float32 island on ``module`` would pass the budget."""
    cost = float32_extra_bytes(module)
    if location.memory_budget is not None and cost > location.memory_budget:
        raise Declined(
            f"a float32 island on {name} would add {cost} bytes; the memory budget has "
            f"{location.memory_budget} left (guard_max_extra_memory)"
        )


def _island(name: str, module: torch.nn.Module) -> Float32Island:
    """A float32 island on ``module``; ``Declined`` if a quantized layer in it cannot compute in float32."""
    try:
        return Float32Island(module, name)
    except Unsupported as reason:
        raise Declined(str(reason)) from None


def _fits(peak: float, dtype: torch.dtype) -> bool:
    return math.isfinite(peak) and peak <= torch.finfo(dtype).max / FIT_HEADROOM


class UpcastStrategy:
    """Escalates from the overflowing module to its parents until a float32 island fits."""

    name = "upcast"

    def recover(self, location: Location) -> UpcastFix | None:
        *enclosing, component = location.calls
        blocker = reloading_blocker(component.module, component.name)
        if blocker is not None:
            raise Declined(blocker)
        for depth, call in enumerate(enclosing):
            _check_affordable(call.name, call.module, location)  # enclosing modules cost at least as much
            island = _island(call.name, call.module)
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
        _check_affordable(component.name, component.module, location)
        return UpcastFix(component.name, _island(component.name, component.module), None)

    def validate(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> None:
        """Check a plan entry, changing nothing: a float32 island, and a peak that is a finite number."""
        check_keys(params, optional=("dtype", "output_absmax"))
        dtype = params.get("dtype", "float32")
        if not isinstance(dtype, str) or dtype != "float32":
            raise ValueError(f"`dtype`: upcast only makes float32 islands, not {reprlib.repr(dtype)}.")
        peak = params.get("output_absmax")
        if peak is not None and not (is_real(peak) and peak >= 0):
            raise ValueError(f"`output_absmax` must be null or a number >= 0, not {reprlib.repr(peak)}.")
        modules(module_name)
        component = module_name.partition(".")[0]
        blocker = reloading_blocker(modules(component), component)
        if blocker is not None:
            raise ValueError(f"{blocker}.")

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> UpcastFix:
        self.validate(module_name, params, modules)
        try:
            island = Float32Island(modules(module_name), module_name)
        except Unsupported as reason:
            raise ValueError(f"{reason}.") from None
        return UpcastFix(module_name, island, params.get("output_absmax"))


@hookimpl
def register_strategies(register: Any) -> None:
    register(UpcastStrategy())
