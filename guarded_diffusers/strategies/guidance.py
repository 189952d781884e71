"""Guidance: Flux's timestep and guidance embedding inputs computed in float32, where they overflow.

``FluxTransformer2DModel.forward`` scales the timestep and the guidance by 1000 in the working
dtype before any submodule runs (``guidance.to(hidden_states.dtype) * 1000``). From guidance
65.5 on, float16 gives inf for every Flux model, and the first module to see it is
``time_text_embed.time_proj``. No submodule is at fault, and a float32 transformer would double
its memory. This fix keeps the float32 ``timestep`` and ``guidance`` the pipeline passed to the
transformer and hands ``time_text_embed`` their products with 1000 computed in float32.
diffusers' sinusoidal projection already computes in float32, and the embedding is then cast to
the working dtype, so the result is float32's at no memory cost.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings
from torch import nn

from ..core.checks import host_absmax
from ..core.context import in_guarded_call
from ..core.hookspecs import hookimpl
from ..core.locate import Location
from ..core.recovery import ModuleLookup
from .hooks import HookFix

# What FluxTransformer2DModel.forward multiplies the timestep and the guidance by.
EMBEDDING_SCALE = 1000.0
# The embedder's timestep must match the transformer's float32 timestep x scale this closely,
# or the model scales differently and the fix declines: float16 rounds at 2**-11.
_SCALE_CHECK_RTOL = 2.0**-9


@dataclasses.dataclass(eq=False)
class GuidanceFix(HookFix):
    """Hooks that feed ``module_name`` (a ``time_text_embed``) float32 timestep and guidance."""

    scale: float
    strategy: str = "guidance"

    def describe(self) -> dict[str, Any]:
        return {"scale": self.scale}


def _install(component: nn.Module, embedder: nn.Module, module_name: str, scale: float) -> GuidanceFix:
    """Keep the transformer's float32 inputs per thread; substitute their scaled values in the embedder."""
    kept = threading.local()

    # Both take their kwargs optionally: a thread entering the transformer while the hooks are being
    # registered may call them as plain hooks (torch records "with kwargs" in a second dict).
    def keep(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        # Only in guarded calls: a plain pipeline sharing the transformer keeps diffusers' numbers.
        guarded = in_guarded_call() and kwargs is not None
        kept.inputs = (kwargs.get("timestep"), kwargs.get("guidance")) if guarded else None

    def forget(module: nn.Module, args: tuple, *kwargs_and_output: Any) -> None:
        kept.inputs = None

    def substitute(module: nn.Module, args: tuple) -> tuple | None:
        timestep, guidance = getattr(kept, "inputs", None) or (None, None)
        if timestep is None or guidance is None or len(args) < 2:
            return None  # a call this fix was not made for: leave it as diffusers computes it
        return (timestep.float() * scale, guidance.float() * scale, *args[2:])

    handles = [
        component.register_forward_pre_hook(keep, with_kwargs=True),
        component.register_forward_hook(forget, with_kwargs=True, always_call=True),
        embedder.register_forward_pre_hook(substitute),
    ]
    return GuidanceFix(module_name, handles, scale)


class GuidanceStrategy:
    """Fixes the guidance x 1000 overflow in a Flux transformer's own forward; declines anything else."""

    name = "guidance"

    def recover(self, location: Location) -> GuidanceFix | None:
        component = location.calls[-1]
        embedder = getattr(component.module, "time_text_embed", None)
        if not isinstance(embedder, CombinedTimestepGuidanceTextProjEmbeddings):
            return None
        embed_call = next((call for call in location.calls if call.module is embedder), None)
        timestep, guidance = component.kwargs.get("timestep"), component.kwargs.get("guidance")
        if embed_call is None or len(embed_call.args) < 2 or timestep is None or guidance is None:
            return None
        # The forward's own scaling overflowed: a finite float32 product, a non-finite embedder input.
        if math.isfinite(host_absmax(embed_call.args[1])):
            return None
        if not math.isfinite(host_absmax(guidance.float() * EMBEDDING_SCALE)):
            return None
        expected = timestep.float() * EMBEDDING_SCALE
        if not torch.allclose(embed_call.args[0].float(), expected, rtol=_SCALE_CHECK_RTOL, atol=1e-3):
            return None
        return _install(component.module, embedder, embed_call.name, EMBEDDING_SCALE)

    def apply(self, module_name: str, params: Mapping[str, Any], modules: ModuleLookup) -> GuidanceFix:
        scale = params.get("scale", EMBEDDING_SCALE)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < math.inf:
            raise ValueError(f"guidance needs a positive finite `scale`, got {scale!r}.")
        embedder = modules(module_name)
        if not isinstance(embedder, CombinedTimestepGuidanceTextProjEmbeddings):
            raise ValueError(
                f"guidance fixes a Flux `time_text_embed` with guidance; {module_name} is "
                f"{type(embedder).__name__}."
            )
        component = modules(module_name.split(".", 1)[0])
        if getattr(component, "time_text_embed", None) is not embedder:
            raise ValueError(f"guidance fixes a component's own `time_text_embed`; {module_name} is not one.")
        return _install(component, embedder, module_name, float(scale))


@hookimpl
def register_strategies(register: Any) -> None:
    register(GuidanceStrategy())
