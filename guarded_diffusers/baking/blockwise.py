"""Block by block: a component whose residual blocks hold their weights only while they run.

A 12B Flux transformer is 44 GiB of float32 block weights; calibration needs float32. Within
``streamed_blocks`` every residual block (``core.stream.residual_blocks``: Flux's double and
single blocks, T5's and CLIP's layers, a VAE's up and down blocks) keeps its parameters on the
meta device and reads them from the safetensors files just before its forward, in float32 (and
scaled by a bake's exponents if given), dropping them right after: peak memory is the rest of the
component, one block and the activations. The tracer sees the same layers and operations, so
calibration finds the same cuts and peaks as with the whole component in memory. Writing already
streams one tensor at a time (``write``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.stream import residual_blocks
from .tensorfile import read_header, read_tensor, tensors_of


def _parameter_slots(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, attribute, dotted name) of every parameter of ``module``."""
    return [
        (owner, attribute, f"{path}.{attribute}" if path else attribute)
        for path, owner in module.named_modules()
        for attribute in list(owner._parameters)
        if owner._parameters[attribute] is not None
    ]


@contextlib.contextmanager
def streamed_blocks(
    component: nn.Module,
    files: Sequence[Path],
    exponents: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[list[str]]:
    """Within: each residual block of ``component`` reads its parameters from ``files`` per forward.

    ``files`` hold the component's state dict (one file or an index's shards); the blocks'
    parameters are on the meta device before and after. Yields the blocks' names.
    """
    exponents = exponents or {}
    handles: list[Any] = []
    with contextlib.ExitStack() as stack:
        where = {}
        for path in files:
            file = stack.enter_context(open(path, "rb"))
            header, start = read_header(file)
            where.update({key: (file, entry, start) for key, entry in tensors_of(header).items()})
        names = {id(module): name for name, module in component.named_modules()}
        blocks = residual_blocks(component)
        for block in blocks:
            prefix = names[id(block)]
            slots = _parameter_slots(block)
            _release(slots)

            def load(module: nn.Module, args: tuple, slots: list = slots, prefix: str = prefix) -> None:
                with torch._C.DisableTorchFunction():  # loading is no part of the traced dataflow
                    _load(slots, prefix)

            def _load(slots: list, prefix: str) -> None:
                for owner, attribute, name in slots:
                    key = f"{prefix}.{name}"
                    tensor = read_tensor(*where[key]).to(dtype)
                    if exponents.get(key):
                        tensor = tensor * 2.0 ** exponents[key]
                    owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)

            def release(module: nn.Module, args: tuple, output: Any, slots: list = slots) -> None:
                with torch._C.DisableTorchFunction():
                    _release(slots)

            handles.append(block.register_forward_pre_hook(load))
            handles.append(block.register_forward_hook(release))
        try:
            yield [names[id(block)] for block in blocks]
        finally:
            for handle in handles:
                handle.remove()


def _release(slots: list[tuple[nn.Module, str, str]]) -> None:
    for owner, attribute, _ in slots:
        current = owner._parameters[attribute]
        owner._parameters[attribute] = nn.Parameter(
            torch.empty_like(current, device="meta"), requires_grad=False
        )
