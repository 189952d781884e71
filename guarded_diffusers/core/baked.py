"""The bake's exponents a component carries: what a guard knows of a baked folder's scales.

A component ``from_pretrained`` loaded from a baked folder (``fluxguard bake``) carries, under
``BAKE_MARK``, the power of two each of its scaled tensors holds (``pipelines.baked_lora``
records it); the mark travels with the module (``from_pipe``, copies). A fix that scales weights
at run time measures on those weights, so its exponent multiplies on top of the bake's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

BAKE_MARK = "_fluxguard_bake_exponents"


def baked_exponents(components: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{component: {tensor name: exponent}}`` of the components loaded from a bake."""
    return {
        name: dict(getattr(component, BAKE_MARK))
        for name, component in components.items()
        if isinstance(component, nn.Module) and isinstance(getattr(component, BAKE_MARK, None), dict)
    }
