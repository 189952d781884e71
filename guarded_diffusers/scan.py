"""Headroom statistics: every module's largest input and output magnitudes, recorded in float32.

A module's headroom in a working dtype is ``log2(dtype max / absmax)``: how many doublings its
output can take before that dtype overflows. Recording runs the model in float32, so an output
that would overflow float16 is measured instead of becoming inf: the scan predicts an overflow
without ever seeing a NaN.

Inputs are recorded too, because some overflows happen between modules, in a parent's
``forward``: FluxTransformer2DModel multiplies the guidance by 1000 before its embedder sees it,
so at guidance 66 no module's output is large, but ``time_text_embed``'s input is. Values at
exactly float32's largest magnitude are attention-mask sentinels (``finfo(dtype).min``), which
a model builds in whatever dtype it runs in; they are left out of the input maximum.

The running maxima stay on the device during a sample (a few reductions per module call) and
are read to the host once per sample.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .checks import absmax_on_device, floating_tensors

# The pipeline components with weights; modules are named "component.path" as in the guard's reports.
COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "transformer")
FORMAT = "guarded-diffusers/headroom-report"
VERSION = 2


def input_absmax_on_device(tree: Any) -> torch.Tensor | None:
    """Largest magnitude over the floating tensors in ``tree``, mask sentinels left out."""
    magnitudes = [tensor.detach().abs() for tensor in floating_tensors(tree)]
    return absmax_on_device([m.masked_fill(m == torch.finfo(m.dtype).max, 0) for m in magnitudes])


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """What one sample did to each module that ran: largest output and input magnitudes, calls."""

    index: int
    absmax: dict[str, float]
    input_absmax: dict[str, float]
    calls: dict[str, int]


class _RunningMax:
    """Per-name maxima kept as device scalars; ``read()`` moves them all to the host at once."""

    def __init__(self) -> None:
        self.peaks: dict[str, torch.Tensor] = {}

    def raise_to(self, name: str, peak: torch.Tensor | None) -> None:
        if peak is not None:
            held = self.peaks.get(name)
            self.peaks[name] = peak if held is None else torch.maximum(held, peak.to(held.device))

    def read(self) -> dict[str, float]:
        names = sorted(self.peaks)
        values: list[float] = []
        if names:
            device = self.peaks[names[0]].device
            values = torch.stack([self.peaks[name].to(device) for name in names]).cpu().tolist()
        self.peaks.clear()
        return dict(zip(names, values, strict=True))


class AbsmaxRecorder:
    """Forward hooks on every module of the pipeline's components; ``take()`` ends one sample."""

    def __init__(self, pipeline: Any) -> None:
        self.classes: dict[str, str] = {}
        self._outputs = _RunningMax()
        self._inputs = _RunningMax()
        self._calls: collections.Counter[str] = collections.Counter()
        self._handles = []
        for component in COMPONENTS:
            root = getattr(pipeline, component, None)
            if not isinstance(root, nn.Module):
                continue
            for path, module in root.named_modules():
                name = f"{component}.{path}" if path else component
                self.classes[name] = type(module).__name__
                self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._outputs.raise_to(name, absmax_on_device(output))
            self._inputs.raise_to(name, input_absmax_on_device((args, kwargs)))
            self._calls[name] += 1

        return record

    def take(self, index: int) -> SampleRecord:
        """The sample just run, read to the host; the recorder starts afresh."""
        record = SampleRecord(index, self._outputs.read(), self._inputs.read(), dict(self._calls))
        self._calls.clear()
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def headroom_bits(absmax: float, dtype_max: float) -> float:
    """``log2(dtype_max / absmax)``: +inf for an all-zero tensor, -inf for a non-finite one."""
    if not math.isfinite(absmax):
        return -math.inf
    return math.inf if absmax == 0 else math.log2(dtype_max / absmax)


def _json_absmax(value: float) -> float | str:
    return value if math.isfinite(value) else str(abs(value))


def _json_bits(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class ModuleHeadroom:
    """One module's merged statistics; ``at_risk`` when its output or input headroom is under the margin."""

    module: str
    module_class: str
    calls: int
    absmax: float
    headroom_bits: float
    input_absmax: float
    input_headroom_bits: float
    at_risk: bool

    @property
    def lowest_bits(self) -> float:
        """The smaller of the output and input headroom: what the module is sorted and charted by."""
        return min(self.headroom_bits, self.input_headroom_bits)

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: an infinite headroom is ``null`` and a non-finite absmax the string ``"inf"``."""
        return {
            "module": self.module,
            "module_class": self.module_class,
            "calls": self.calls,
            "absmax": _json_absmax(self.absmax),
            "headroom_bits": _json_bits(self.headroom_bits),
            "input_absmax": _json_absmax(self.input_absmax),
            "input_headroom_bits": _json_bits(self.input_headroom_bits),
            "at_risk": self.at_risk,
        }


@dataclasses.dataclass(frozen=True)
class HeadroomScan:
    """Merged statistics of a scan, modules sorted by their lowest headroom, then by name."""

    model: str
    dtype: str
    margin_bits: float
    samples: int
    sampling: dict[str, Any]
    modules: tuple[ModuleHeadroom, ...]

    @property
    def dtype_max(self) -> float:
        return torch.finfo(getattr(torch, self.dtype)).max

    @property
    def at_risk(self) -> tuple[ModuleHeadroom, ...]:
        return tuple(module for module in self.modules if module.at_risk)

    def by_name(self) -> dict[str, ModuleHeadroom]:
        return {module.module: module for module in self.modules}

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report is a function of the model, the arguments and the samples."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "dtype": self.dtype,
            "dtype_max": self.dtype_max,
            "recorded_in": "float32",
            "margin_bits": self.margin_bits,
            "samples": self.samples,
            "sampling": self.sampling,
            "at_risk": [module.module for module in self.at_risk],
            "modules": [module.to_dict() for module in self.modules],
        }


def _maxima(per_sample: Iterable[dict[str, float]]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for sample in per_sample:
        for name, value in sample.items():
            peaks[name] = max(peaks.get(name, value), value)
    return peaks


def merge(
    records: Iterable[SampleRecord],
    classes: dict[str, str],
    *,
    model: str,
    dtype: str,
    margin_bits: float,
    sampling: dict[str, Any],
) -> HeadroomScan:
    """Largest magnitudes and total calls per module over ``records``, whichever process recorded them."""
    records = sorted(records, key=lambda record: record.index)
    outputs = _maxima(record.absmax for record in records)
    inputs = _maxima(record.input_absmax for record in records)
    calls = collections.Counter()
    for record in records:
        calls.update(record.calls)
    dtype_max = torch.finfo(getattr(torch, dtype)).max
    modules = []
    for name in sorted(outputs.keys() | inputs.keys()):
        absmax, input_absmax = outputs.get(name, 0.0), inputs.get(name, 0.0)
        bits, input_bits = headroom_bits(absmax, dtype_max), headroom_bits(input_absmax, dtype_max)
        at_risk = min(bits, input_bits) < margin_bits
        modules.append(
            ModuleHeadroom(name, classes[name], calls[name], absmax, bits, input_absmax, input_bits, at_risk)
        )
    modules.sort(key=lambda module: (module.lowest_bits, module.module))
    return HeadroomScan(model, dtype, margin_bits, len(records), sampling, tuple(modules))
