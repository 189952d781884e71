"""diffusers in float16 without black images: detect non-finite values at every stage and recover.

The public names are imported on first use (PEP 562), so ``import guarded_diffusers`` and the
``fluxguard`` command's ``--help`` do not pay for importing torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .baking.lora import bake_lora
    from .baking.record import BakedCut, BakeRecord, NotBakedError, read_bake
    from .baking.run import BakeError, BakeResult, bake
    from .baking.verify import FLOAT16_TOLERANCE_DB
    from .core.devices import resolve_device
    from .core.fidelity import as_displayed, psnr
    from .core.hookspecs import hookimpl
    from .core.options import GuardOptions
    from .core.plan import PrecisionPlan
    from .core.plugins import plugin_manager
    from .core.recovery import Declined, Fix, RecoveryStrategy
    from .core.report import Attempt, DegradedFixWarning, FixInForce, GuardReport, Incident, NonFiniteError
    from .core.stream import saturation_limit
    from .pipelines.attach import guard, unguard
    from .pipelines.classes import (
        GuardedFluxImg2ImgPipeline,
        GuardedFluxInpaintPipeline,
        GuardedFluxKontextInpaintPipeline,
        GuardedFluxKontextPipeline,
        GuardedFluxPipeline,
        GuardedStableDiffusion3Img2ImgPipeline,
        GuardedStableDiffusion3InpaintPipeline,
        GuardedStableDiffusion3Pipeline,
        GuardedStableDiffusionImg2ImgPipeline,
        GuardedStableDiffusionInpaintPipeline,
        GuardedStableDiffusionPipeline,
        GuardedStableDiffusionXLImg2ImgPipeline,
        GuardedStableDiffusionXLInpaintPipeline,
        GuardedStableDiffusionXLPipeline,
    )
    from .pipelines.flux_fill import GuardedFluxFillPipeline
    from .pipelines.guarded import GuardedPipeline, pixel_multiple
    from .pipelines.outputs import GuardedFluxPipelineOutput

# Public name -> the submodule that defines it.
_EXPORTS = {
    "as_displayed": "core.fidelity",
    "Attempt": "core.report",
    "bake": "baking.run",
    "BakedCut": "baking.record",
    "BakeError": "baking.run",
    "BakeRecord": "baking.record",
    "BakeResult": "baking.run",
    "bake_lora": "baking.lora",
    "Declined": "core.recovery",
    "DegradedFixWarning": "core.report",
    "Fix": "core.recovery",
    "FLOAT16_TOLERANCE_DB": "baking.verify",
    "FixInForce": "core.report",
    "guard": "pipelines.attach",
    "GuardedFluxFillPipeline": "pipelines.flux_fill",
    "GuardedFluxImg2ImgPipeline": "pipelines.classes",
    "GuardedFluxInpaintPipeline": "pipelines.classes",
    "GuardedFluxKontextInpaintPipeline": "pipelines.classes",
    "GuardedFluxKontextPipeline": "pipelines.classes",
    "GuardedFluxPipeline": "pipelines.classes",
    "GuardedFluxPipelineOutput": "pipelines.outputs",
    "GuardedPipeline": "pipelines.guarded",
    "GuardedStableDiffusion3Img2ImgPipeline": "pipelines.classes",
    "GuardedStableDiffusion3InpaintPipeline": "pipelines.classes",
    "GuardedStableDiffusion3Pipeline": "pipelines.classes",
    "GuardedStableDiffusionImg2ImgPipeline": "pipelines.classes",
    "GuardedStableDiffusionInpaintPipeline": "pipelines.classes",
    "GuardedStableDiffusionPipeline": "pipelines.classes",
    "GuardedStableDiffusionXLImg2ImgPipeline": "pipelines.classes",
    "GuardedStableDiffusionXLInpaintPipeline": "pipelines.classes",
    "GuardedStableDiffusionXLPipeline": "pipelines.classes",
    "GuardOptions": "core.options",
    "GuardReport": "core.report",
    "hookimpl": "core.hookspecs",
    "Incident": "core.report",
    "NonFiniteError": "core.report",
    "NotBakedError": "baking.record",
    "pixel_multiple": "pipelines.guarded",
    "plugin_manager": "core.plugins",
    "PrecisionPlan": "core.plan",
    "psnr": "core.fidelity",
    "read_bake": "baking.record",
    "RecoveryStrategy": "core.recovery",
    "resolve_device": "core.devices",
    "saturation_limit": "core.stream",
    "unguard": "pipelines.attach",
}

__all__ = [
    "FLOAT16_TOLERANCE_DB",
    "Attempt",
    "BakeError",
    "BakeRecord",
    "BakeResult",
    "BakedCut",
    "Declined",
    "DegradedFixWarning",
    "Fix",
    "FixInForce",
    "GuardOptions",
    "GuardReport",
    "GuardedFluxFillPipeline",
    "GuardedFluxImg2ImgPipeline",
    "GuardedFluxInpaintPipeline",
    "GuardedFluxKontextInpaintPipeline",
    "GuardedFluxKontextPipeline",
    "GuardedFluxPipeline",
    "GuardedFluxPipelineOutput",
    "GuardedPipeline",
    "GuardedStableDiffusion3Img2ImgPipeline",
    "GuardedStableDiffusion3InpaintPipeline",
    "GuardedStableDiffusion3Pipeline",
    "GuardedStableDiffusionImg2ImgPipeline",
    "GuardedStableDiffusionInpaintPipeline",
    "GuardedStableDiffusionPipeline",
    "GuardedStableDiffusionXLImg2ImgPipeline",
    "GuardedStableDiffusionXLInpaintPipeline",
    "GuardedStableDiffusionXLPipeline",
    "Incident",
    "NonFiniteError",
    "NotBakedError",
    "PrecisionPlan",
    "RecoveryStrategy",
    "as_displayed",
    "bake",
    "bake_lora",
    "guard",
    "hookimpl",
    "pixel_multiple",
    "plugin_manager",
    "psnr",
    "read_bake",
    "resolve_device",
    "saturation_limit",
    "unguard",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
