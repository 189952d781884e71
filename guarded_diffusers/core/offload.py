"""Offloaded weights: where a layer's values live between forwards, and offloading that reloads them.

- accelerate's ``cpu_offload`` (what ``enable_sequential_cpu_offload`` installs on each
  component): parameters stay on the meta device; before each forward the layer's
  ``AlignDevicesHook`` loads them from its ``weights_map`` and casts them to the meta parameter's
  dtype. So a float32 island works by converting the meta parameters (the hook then loads float32
  copies for each forward), and a value change (a rescale shift) has to be made in the
  ``weights_map`` tensor, which is what ``stored`` returns.
- diffusers' group offloading (``enable_group_offload``): without streams or disk, a group moves
  its own tensors between devices (``.to``, ``.data``), so a fix made on them travels with them.
  With ``use_stream`` a group reloads every tensor from pinned CPU copies taken when offloading
  was enabled, and with ``offload_to_disk_path`` from a file written at its first offload: a fix
  made on the module would be undone at its next forward. ``reloading_blocker`` says so, and the
  weight-changing strategies decline.
- ``enable_model_cpu_offload`` moves whole components (``.to``): fixes travel with them.
"""

from __future__ import annotations

import torch
from torch import nn

_GROUP_OFFLOADING_HOOK = "group_offloading"  # diffusers.hooks.group_offloading._GROUP_OFFLOADING


def _weights_map(layer: nn.Module) -> object | None:
    """The ``weights_map`` of the accelerate hook that loads ``layer``'s own parameters, if any."""
    hook = getattr(layer, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate.weights_map
    return None


def stored(layer: nn.Module, attr: str) -> torch.Tensor:
    """The tensor holding ``layer.<attr>``'s values between forwards: the layer's own parameter, or,
    for a layer accelerate offloads to the meta device, the copy its hook loads from."""
    tensor = getattr(layer, attr)
    weights_map = _weights_map(layer) if tensor.is_meta else None
    return weights_map[attr] if weights_map is not None else tensor


def _group(module: nn.Module) -> object | None:
    """The ``ModuleGroup`` whose hook sits on ``module`` itself, if group offloading put one there."""
    registry = module.__dict__.get("_diffusers_hook")
    hook = registry.get_hook(_GROUP_OFFLOADING_HOOK) if registry is not None else None
    return getattr(hook, "group", None)


def emptied_after_forward(layer: nn.Module, name: str) -> str | None:
    """Why ``layer``'s weights hold no values once its own forward has returned; ``None`` if they do.

    A group offloaded to disk replaces its tensors with empty ones at each offload, so a layer that is
    its own group (leaf level) has nothing left to compute with in a hook that runs after its forward.
    Other offloading leaves the values readable: in the module (moved to the offload device), in
    pinned copies, or in accelerate's ``weights_map`` (``stored``).
    """
    group = _group(layer)
    if group is None or not group.offload_to_disk_path:
        return None
    return (
        f"{name} is group-offloaded to disk on its own (leaf level): its weights are emptied as soon as "
        "its forward returns"
    )


def reloading_blocker(component: nn.Module, name: str) -> str | None:
    """Why a fix changing ``component``'s tensors would not survive its next forward; ``None`` if it would."""
    for module in component.modules():
        group = _group(module)
        if group is None:
            continue
        if group.offload_to_disk_path:
            source = "the files of offload_to_disk_path"
        elif group.stream is not None:
            source = "the pinned CPU copies of use_stream"
        else:
            continue
        return (
            f"{name} is group-offloaded and reloads its weights from {source} at every forward, "
            "which would undo a change made to them"
        )
    return None
