"""How close one pipeline call came to overflowing, per component: the search's target.

For every layer (Linear, Conv, LoRA layer) the largest output magnitude, and for every normalisation
the largest input (the residual stream it normalises), each over its dtype's maximum. Each module
call costs one ``aminmax`` on the device, kept there; at the end of the example one stack and one
reduction per component and dtype, and one host read for all of them. hypothesis then climbs each
component's peak with ``target()``: a search that sees which inputs bring an encoder, the
transformer or the VAE closer to the dtype's limit moves towards the inputs that pass it.

A component's own output is no measure of this: the encoders, the transformer and the VAE all end in
a normalisation, so their outputs look alike whether a layer inside came near overflow or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# The parts of a pipeline whose peaks are targeted separately, as the guard names its stages; a
# pipeline measures those it has (Flux no unet, Stable Diffusion no transformer).
COMPONENTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "vae.encoder",
    "transformer",
    "unet",
    "vae.decoder",
)
# What a target observation is when a value was not finite (a guarded call recovered from it):
# far past any finite ratio, so the search keeps climbing towards overflows, and a finite number
# as hypothesis.target() requires.
OVERFLOWED = 1000.0


def _resolve(pipe: Any, path: str) -> Any:
    target = pipe
    for attr in path.split("."):
        target = getattr(target, attr, None)
    return target


def _is_layer(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) or hasattr(module, "base_layer")


def _is_norm(module: Any) -> bool:
    return "Norm" in type(module).__name__ and not list(module.children())


class PeakMeter:
    """Records, during ``measuring()``, each component's largest value over its dtype's maximum."""

    def __init__(self) -> None:
        self._extremes: dict[tuple[str, Any], list[Any]] = {}

    def _record(self, component: str, tensor: Any) -> None:
        import torch

        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            self._extremes.setdefault((component, tensor.dtype), []).append(torch.aminmax(tensor.detach()))

    @contextlib.contextmanager
    def measuring(self, pipe: Any) -> Iterator[PeakMeter]:
        """Hooks on every layer and normalisation of ``pipe``'s components, removed on exit."""
        self._extremes = {}
        handles = []
        for component in COMPONENTS:
            root = _resolve(pipe, component)
            if root is None or not hasattr(root, "modules"):
                continue
            for module in root.modules():
                if _is_layer(module):
                    handles.append(module.register_forward_hook(self._after_layer(component)))
                elif _is_norm(module):
                    handles.append(module.register_forward_pre_hook(self._before_norm(component)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _after_layer(self, component: str) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            self._record(component, output[0] if isinstance(output, tuple) else output)

        return hook

    def _before_norm(self, component: str) -> Any:
        def hook(module: Any, args: tuple) -> None:
            if args:
                self._record(component, args[0])

        return hook

    def read(self) -> dict[str, float]:
        """Each component's peak ratio (one host read for all); non-finite values as ``OVERFLOWED``."""
        import math

        import torch

        if not self._extremes:
            return {}
        keys = list(self._extremes)
        ratios = []
        for component, dtype in keys:
            lows, highs = zip(*self._extremes[component, dtype], strict=True)
            device = highs[0].device
            peak = torch.maximum(torch.stack(highs).max(), torch.stack(lows).min().neg())
            ratios.append((peak.float() / torch.finfo(dtype).max).to(device))
        values = torch.stack([ratio.to(ratios[0].device) for ratio in ratios]).tolist()
        self._extremes = {}
        peaks: dict[str, float] = {}
        for (component, _), value in zip(keys, values, strict=True):
            value = value if math.isfinite(value) else OVERFLOWED
            peaks[component] = max(peaks.get(component, 0.0), value)
        return peaks
