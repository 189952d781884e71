"""A guarded pipeline loaded from a baked folder scales every LoRA it loads as ``bake_lora`` does.

``mark_baked`` (right after ``from_pretrained``) records on each component loaded from the folder
the exponents of its baked tensors; a component passed in by the caller is not marked, and the marks
travel with the modules (``from_pipe``, copies). ``scales_baked_lora`` (a class decorator) wraps
``load_lora_weights``: while it runs, the pipeline's ``lora_state_dict`` (which every diffusers LoRA
loader reads through, after converting kohya or xlabs keys) hands back the LoRA scaled for the
marked components, so diffusers' metadata, alphas and adapter handling stay its own.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ..baking.lora import baked_exponents, module_layers, scale_lora
from ..baking.write import SIDECAR
from ..core.baked import BAKE_MARK
from ..core.baked import baked_exponents as marked_exponents

_WRAPPED = "_fluxguard_scales_baked_lora"
PipelineClass = TypeVar("PipelineClass", bound=type)


def mark_baked(pipeline: Any, source: str | os.PathLike[str], kwargs: Mapping[str, Any]) -> None:
    """Record the bake's exponents on the components ``from_pretrained(source, **kwargs)`` loaded."""
    if not isinstance(source, str | os.PathLike) or not (Path(source) / SIDECAR).is_file():
        return
    exponents = baked_exponents(source, kwargs.get("variant"))
    for name, component in pipeline.components.items():
        if isinstance(component, nn.Module) and name not in kwargs:
            setattr(component, BAKE_MARK, exponents.get(name, {}))


def baked_components(pipeline: Any) -> dict[str, dict[str, int]]:
    """{component: exponents} of the pipeline's components loaded from a bake."""
    return marked_exponents(pipeline.components)


def scales_baked_lora(cls: PipelineClass) -> PipelineClass:
    """Class decorator: ``load_lora_weights`` scales the LoRA for the components loaded from a bake."""
    inherited = getattr(cls, "load_lora_weights", None)
    if inherited is None or getattr(inherited, _WRAPPED, False):
        return cls

    @functools.wraps(inherited)
    def load_lora_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
        exponents = baked_components(self)
        if not exponents:
            return inherited(self, *args, **kwargs)
        self.__dict__["lora_state_dict"] = _scaled_reader(type(self).lora_state_dict, exponents, self)
        try:
            return inherited(self, *args, **kwargs)
        finally:
            self.__dict__.pop("lora_state_dict", None)

    setattr(load_lora_weights, _WRAPPED, True)
    load_lora_weights.__doc__ = (
        f"{inherited.__doc__ or ''}\n\nFrom a baked folder (fluxguard bake): the LoRA's B matrices of "
        "scaled layers take the layer's power of two (guarded_diffusers.bake_lora)."
    )
    cls.load_lora_weights = load_lora_weights
    return cls


def _scaled_reader(read: Callable[..., Any], exponents: dict[str, dict[str, int]], pipeline: Any) -> Callable:
    def lora_state_dict(*args: Any, **kwargs: Any) -> Any:
        result = read(*args, **kwargs)
        state = result[0] if isinstance(result, tuple) else result
        scaled, _ = scale_lora(state, exponents, module_layers(pipeline.components))
        return (scaled, *result[1:]) if isinstance(result, tuple) else scaled

    return lora_state_dict
