"""fluxguard-vae-float32: when the VAE overflows, run that whole coder in float32.

AUTOMATIC1111's remedy for a NaN VAE, as a guarded-diffusers strategy: coarser than the built-in
``upcast`` (which upcasts only the smallest region that fits), but it never needs a second try
inside the same coder. Anywhere outside the VAE it declines and the next strategy takes over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from guarded_diffusers import Declined, hookimpl
from guarded_diffusers.core.casting import Float32Island, float32_extra_bytes

NAME = "vae-float32"


@dataclasses.dataclass(eq=False)
class CoderInFloat32:
    """The fix: a float32 island over ``vae.encoder`` or ``vae.decoder``."""

    module_name: str
    island: Float32Island
    strategy: str = NAME

    def revert(self) -> None:
        self.island.revert()

    def describe(self) -> dict[str, Any]:
        return {}  # nothing to remember: the module name says it all


class VaeFloat32:
    name = NAME

    def recover(self, location: Any) -> CoderInFloat32 | None:
        component = location.calls[-1]  # the stage's component: vae.encoder, vae.decoder, transformer...
        if not component.name.startswith("vae."):
            return None
        cost = float32_extra_bytes(component.module)
        if location.memory_budget is not None and cost > location.memory_budget:
            # Say why before converting anything: the guard would refuse the fix over budget anyway.
            raise Declined(f"{component.name} in float32 adds {cost} bytes, over guard_max_extra_memory")
        return CoderInFloat32(component.name, Float32Island(component.module))

    def apply(
        self, module_name: str, params: Mapping[str, Any], modules: Callable[[str], nn.Module]
    ) -> CoderInFloat32:
        return CoderInFloat32(module_name, Float32Island(modules(module_name)))


@hookimpl
def register_strategies(register: Callable[[Any], None]) -> None:
    register(VaeFloat32())
