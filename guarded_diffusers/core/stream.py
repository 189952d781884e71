"""The residual stream: where real checkpoints overflow float16, often without a single NaN.

Massive activations live in a few channels of the hidden states that every transformer block
adds to and passes on. diffusers clips that stream at +-65504 in float16 (Flux's single block
output, its double block's text stream) and transformers' T5 clamps it at ``max - 1000`` once an
inf appears: the image stays finite and is silently wrong. So the guard watches every block's
output as well as each component's: a value within ``SATURATION_BAND`` of the dtype's maximum
counts as an overflow ("saturated"), like inf or NaN.

The watch costs one device reduction per block output (``aminmax``), kept on the device and
reduced once per component call; the guard reads that peak together with the component's own
output in its one host read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .checks import absmax_on_device, floating_tensors, host_absmax, tensor_absmax

# diffusers clips at exactly the dtype's maximum, transformers' T5 at ``max - 1000``: a peak at
# or above ``max - SATURATION_BAND`` is where a library has already cut the values.
SATURATION_BAND = 1000.0
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@functools.cache
def saturation_limit(dtype: torch.dtype) -> float:
    """The magnitude from which a ``dtype`` value counts as saturated (inf for float32 and wider)."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return math.inf
    return torch.finfo(dtype).max - SATURATION_BAND


def residual_blocks(component: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``component``: items of its outermost ``ModuleList``s of one class.

    Flux's ``transformer_blocks`` and ``single_transformer_blocks``, T5's ``encoder.block``,
    CLIP's ``encoder.layers``, a VAE's ``down_blocks``/``up_blocks``: each passes the stream on.
    """
    found: list[nn.Module] = []
    for child in component.children():
        if isinstance(child, nn.ModuleList) and len(child) and len({type(item) for item in child}) == 1:
            found.extend(child)
        else:
            found.extend(residual_blocks(child))
    return found


def stream_tensors(block: nn.Module, output: Any) -> list[torch.Tensor]:
    """The hidden states a block passes on: transformers' layers return them first, before extras
    such as T5's position bias (which holds the attention mask at the dtype's minimum)."""
    if type(block).__module__.startswith("transformers.") and isinstance(output, tuple | list):
        output = output[:1]
    if isinstance(output, torch.Tensor):  # the common cases, without walking a tree
        return [output] if output.is_floating_point() else []
    if isinstance(output, tuple | list) and all(isinstance(item, torch.Tensor) for item in output):
        return [item for item in output if item.is_floating_point()]
    return floating_tensors(output)


def saturation_ratio(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """max |x| / saturation limit over ``tensors``, as a float32 device scalar (>= 1: saturated).

    NaN and inf propagate; tensors of a dtype that cannot saturate count as 0.
    """
    ratios = [
        tensor_absmax(t) / saturation_limit(t.dtype)
        for t in tensors
        if t.numel() and math.isfinite(saturation_limit(t.dtype))
    ]
    if not ratios:
        return None
    return ratios[0] if len(ratios) == 1 else torch.stack([r.to(ratios[0].device) for r in ratios]).amax()


def overflow_kind(module: nn.Module, output: Any, blocks: Collection[nn.Module]) -> str | None:
    """``"non-finite"``, ``"saturated"`` or ``None`` for one module output, during a diagnosis.

    Saturation counts for layers and blocks only: other modules may legitimately produce the
    dtype's extremes (attention masks at ``finfo.min``).
    """
    peak = host_absmax(output)
    if not math.isfinite(peak):
        return "non-finite"
    if isinstance(module, _LAYERS):
        tensors = floating_tensors(output)
    elif module in blocks:
        tensors = stream_tensors(module, output)
    else:
        return None
    ratio = saturation_ratio(tensors)
    return "saturated" if ratio is not None and ratio.item() >= 1.0 else None


def stage_verdict(output: Any, block_ratio: torch.Tensor | None) -> str | None:
    """A component call's verdict from its output and its blocks' accumulated ratio: one host read."""
    tensors = floating_tensors(output)
    peak = absmax_on_device(tensors)
    if peak is None and block_ratio is None:
        return None
    if peak is None:
        peak_value, ratio = 0.0, block_ratio.item()
    elif block_ratio is None:
        peak_value, ratio = peak.item(), 0.0
    else:
        peak_value, ratio = torch.stack([peak, block_ratio.to(peak.device)]).tolist()
    if not (math.isfinite(peak_value) and math.isfinite(ratio)):
        return "non-finite"
    limit = min((saturation_limit(t.dtype) for t in tensors), default=math.inf)
    return "saturated" if peak_value >= limit or ratio >= 1.0 else None


class StreamWatch:
    """Collects, on the device, the extremes of every block output of one component call.

    Per block call: one ``aminmax`` per stream tensor, nothing else; the extremes are reduced once,
    when the component's check reads them. Kept per dtype (a float32 stream, as the ``residual``
    fix makes, cannot saturate and is not watched).
    """

    def __init__(self, blocks: list[nn.Module], gate: Callable[[], bool] = lambda: True) -> None:
        self.blocks = blocks
        self._gate = gate  # whose block calls count: the watching call's, not a sharing pipeline's
        self._extremes: dict[torch.dtype, list[torch.Tensor]] = {}

    def install(self) -> list[RemovableHandle]:
        return [block.register_forward_hook(self._after_block) for block in self.blocks]

    def _after_block(self, block: nn.Module, args: tuple, output: Any) -> None:
        if not self._gate():
            return
        for tensor in stream_tensors(block, output):
            if tensor.numel() and math.isfinite(saturation_limit(tensor.dtype)):
                self._extremes.setdefault(tensor.dtype, []).extend(torch.aminmax(tensor.detach()))

    def take(self) -> torch.Tensor | None:
        """The peak saturation ratio since the last ``take`` (``None`` if no block ran), and start afresh."""
        ratios = []
        for dtype, extremes in self._extremes.items():
            device = extremes[0].device
            magnitudes = torch.stack([value.to(device) for value in extremes]).abs()
            ratios.append(magnitudes.amax().float() / saturation_limit(dtype))
        self._extremes = {}
        if not ratios:
            return None
        return ratios[0] if len(ratios) == 1 else torch.stack([r.to(ratios[0].device) for r in ratios]).amax()
