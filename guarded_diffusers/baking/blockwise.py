"""Block by block: a component whose residual blocks hold their weights only while they run.

A 12B Flux transformer is 44 GiB of float32 block weights; calibration needs float32. Within
``streamed_blocks`` every residual block (``core.stream.residual_blocks``: Flux's double and
single blocks, T5's and CLIP's layers, a VAE's up and down blocks) keeps its parameters on the
meta device and reads them from the safetensors files just before its forward (scaled by a bake's
exponents if given), dropping them right after: peak memory is the rest of the component, one
block and the activations. Each tensor is read in its placeholder's dtype, so a half-precision run
casts the meta placeholders as ``from_pretrained`` would (``verify.cast_copy``: T5's ``wo`` stays
float32). The tracer sees the same layers and operations, so calibration finds the same cuts and
peaks as with the whole component in memory. Writing already streams one tensor at a time
(``write``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.stream import residual_blocks
from .tensorfile import opened, read_tensor


def _parameter_slots(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, attribute, dotted name) of every parameter of ``module``."""
    return [
        (owner, attribute, f"{path}.{attribute}" if path else attribute)
        for path, owner in module.named_modules()
        for attribute in list(owner._parameters)
        if owner._parameters[attribute] is not None
    ]


def block_names(component: nn.Module) -> list[str]:
    """The dotted names of ``component``'s residual blocks, in order."""
    names = {id(module): name for name, module in component.named_modules()}
    return [names[id(block)] for block in residual_blocks(component)]


@contextlib.contextmanager
def streamed_blocks(
    component: nn.Module,
    files: Sequence[Path],
    exponents: dict[str, int] | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[list[str]]:
    """Within: each residual block of ``component`` reads its parameters from ``files`` per forward.

    ``files`` hold the component's state dict (one file or an index's shards); the blocks'
    parameters are on the meta device before and after. A scaled tensor is scaled in float32 and
    then cast, as a float32 bake cast afterwards would. Yields the blocks' names.
    """
    exponents = exponents or {}
    handles: list[Any] = []
    with opened(files) as where:
        prefixes = block_names(component)
        for block, prefix in zip(residual_blocks(component), prefixes, strict=True):
            slots = _parameter_slots(block)
            _release(slots)

            def load(module: nn.Module, args: tuple, slots: list = slots, prefix: str = prefix) -> None:
                with torch._C.DisableTorchFunction():  # loading is no part of the traced dataflow
                    for owner, attribute, name in slots:
                        key = f"{prefix}.{name}"
                        dtype = owner._parameters[attribute].dtype
                        tensor = read_tensor(*where[key])
                        if exponents.get(key):
                            tensor = tensor.float().mul_(2.0 ** exponents[key])  # a fresh tensor
                        tensor = tensor.to(device=device, dtype=dtype)
                        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)

            def release(module: nn.Module, args: tuple, output: Any, slots: list = slots) -> None:
                with torch._C.DisableTorchFunction():
                    _release(slots)

            handles.append(block.register_forward_pre_hook(load))
            handles.append(block.register_forward_hook(release, always_call=True))
        try:
            yield prefixes
        finally:
            for handle in handles:
                handle.remove()


def _release(slots: list[tuple[nn.Module, str, str]]) -> None:
    for owner, attribute, _ in slots:
        current = owner._parameters[attribute]
        owner._parameters[attribute] = nn.Parameter(
            torch.empty_like(current, device="meta"), requires_grad=False
        )
