"""The stages of a pipeline call, found from its components rather than from a list kept per pipeline.

Every ``nn.Module`` component is a stage, named by what it does in diffusers' pipelines: text
encoders (``text_encoder``, ``text_encoder_2``, ...) by their component name, the denoiser
(``transformer``, ``unet``, ``prior``) as ``denoise`` with one step per call, ControlNets and
image encoders by their names. A component with an ``encoder`` and a ``decoder`` (every diffusers
VAE) is two stages, ``vae_encode`` and ``vae_decode``, hooked on those submodules: pipelines call
``vae.encode()``/``vae.decode()`` (tiled and sliced decoding included), never ``vae.forward``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

# Component names of the model that runs once per denoising step.
_DENOISERS = re.compile(r"(transformer|unet|prior|decoder)(_\d+)?")
# Components that run per step beside the denoiser, so their incidents carry the step too.
_PER_STEP = re.compile(r"controlnet(_\d+)?")
# The stage that checks latents after each scheduler step; no module to fix there.
SCHEDULER_STAGE = "scheduler_step"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A checked stage: the name reported in incidents and the component path it runs.

    ``counts_steps``: each call is one denoising step; ``per_step``: it runs inside the denoising
    loop, so its incidents carry the step the denoiser is at.
    """

    name: str
    component: str
    counts_steps: bool = False
    per_step: bool = False


def resolve_component(pipeline: Any, path: str) -> nn.Module | None:
    """The module at a dotted component path (``vae.decoder``), or None when the pipeline has none."""
    target = pipeline
    for attr in path.split("."):
        target = getattr(target, attr, None)
    return target if isinstance(target, nn.Module) else None


def discover_stages(pipeline: Any) -> tuple[Stage, ...]:
    """The stages of ``pipeline``, in the order its components are registered."""
    stages: list[Stage] = []
    denoisers = [name for name in pipeline.components if _DENOISERS.fullmatch(name)]
    for name, component in pipeline.components.items():
        if not isinstance(component, nn.Module):
            continue
        if _is_autoencoder(component):
            prefix = "vae" if name == "vae" else name
            stages.append(Stage(f"{prefix}_encode", f"{name}.encoder"))
            stages.append(Stage(f"{prefix}_decode", f"{name}.decoder"))
        elif name in denoisers:
            stage_name = "denoise" if name == denoisers[0] else f"denoise_{name}"
            stages.append(Stage(stage_name, name, counts_steps=name == denoisers[0], per_step=True))
        else:
            stages.append(Stage(name, name, per_step=bool(_PER_STEP.fullmatch(name))))
    return tuple(stages)


def stage_components(stages: tuple[Stage, ...]) -> tuple[str, ...]:
    """The pipeline attributes the stages run, once each, in stage order."""
    return tuple(dict.fromkeys(stage.component.split(".")[0] for stage in stages))


def _is_autoencoder(component: nn.Module) -> bool:
    return all(isinstance(getattr(component, part, None), nn.Module) for part in ("encoder", "decoder"))
