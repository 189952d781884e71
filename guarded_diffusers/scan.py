"""Headroom statistics: every module's largest output magnitude, recorded in float32, merged over samples.

A module's headroom in a working dtype is ``log2(dtype max / absmax)``: how many doublings its
output can take before that dtype overflows. Recording runs the model in float32, so an output
that would overflow float16 is measured instead of becoming inf: the scan predicts an overflow
without ever seeing a NaN. The running maximum stays on the device during a sample (one
reduction per module call) and is read to the host once per sample.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .checks import absmax_on_device

# The pipeline components with weights; modules are named "component.path" as in the guard's reports.
COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "transformer")
FORMAT = "guarded-diffusers/headroom-report"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """What one sample did to each module that ran: largest output magnitude and number of calls."""

    index: int
    absmax: dict[str, float]
    calls: dict[str, int]


class AbsmaxRecorder:
    """Forward hooks on every module of the pipeline's components; ``take()`` ends one sample."""

    def __init__(self, pipeline: Any) -> None:
        self.classes: dict[str, str] = {}
        self._peaks: dict[str, torch.Tensor] = {}
        self._calls: collections.Counter[str] = collections.Counter()
        self._handles = []
        for component in COMPONENTS:
            root = getattr(pipeline, component, None)
            if not isinstance(root, nn.Module):
                continue
            for path, module in root.named_modules():
                name = f"{component}.{path}" if path else component
                self.classes[name] = type(module).__name__
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            peak = absmax_on_device(output)
            if peak is None:
                return
            held = self._peaks.get(name)
            self._peaks[name] = peak if held is None else torch.maximum(held, peak.to(held.device))
            self._calls[name] += 1

        return record

    def take(self, index: int) -> SampleRecord:
        """The sample just run, read to the host in one transfer; the recorder starts afresh."""
        names = sorted(self._peaks)
        values: list[float] = []
        if names:
            device = self._peaks[names[0]].device
            values = torch.stack([self._peaks[name].to(device) for name in names]).cpu().tolist()
        record = SampleRecord(index, dict(zip(names, values, strict=True)), dict(self._calls))
        self._peaks.clear()
        self._calls.clear()
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def headroom_bits(absmax: float, dtype_max: float) -> float:
    """``log2(dtype_max / absmax)``: +inf for an all-zero output, -inf for a non-finite one."""
    if not math.isfinite(absmax):
        return -math.inf
    return math.inf if absmax == 0 else math.log2(dtype_max / absmax)


@dataclasses.dataclass(frozen=True)
class ModuleHeadroom:
    """One module's merged statistics; ``at_risk`` when its headroom is under the scan's margin."""

    module: str
    module_class: str
    calls: int
    absmax: float
    headroom_bits: float
    at_risk: bool

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: an infinite headroom is ``null`` and a non-finite absmax the string ``"inf"``."""
        return {
            "module": self.module,
            "module_class": self.module_class,
            "calls": self.calls,
            "absmax": self.absmax if math.isfinite(self.absmax) else str(abs(self.absmax)),
            "headroom_bits": round(self.headroom_bits, 4) if math.isfinite(self.headroom_bits) else None,
            "at_risk": self.at_risk,
        }


@dataclasses.dataclass(frozen=True)
class HeadroomScan:
    """Merged statistics of a scan, modules sorted by headroom (lowest first, then by name)."""

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


def merge(
    records: Iterable[SampleRecord],
    classes: dict[str, str],
    *,
    model: str,
    dtype: str,
    margin_bits: float,
    sampling: dict[str, Any],
) -> HeadroomScan:
    """Largest absmax and total calls per module over ``records``, whichever process recorded them."""
    records = sorted(records, key=lambda record: record.index)
    peaks: dict[str, float] = {}
    calls: collections.Counter[str] = collections.Counter()
    for record in records:
        for name, value in record.absmax.items():
            peaks[name] = max(peaks.get(name, value), value)
        calls.update(record.calls)
    dtype_max = torch.finfo(getattr(torch, dtype)).max
    modules = []
    for name, absmax in peaks.items():
        bits = headroom_bits(absmax, dtype_max)
        modules.append(ModuleHeadroom(name, classes[name], calls[name], absmax, bits, bits < margin_bits))
    modules.sort(key=lambda module: (module.headroom_bits, module.module))
    return HeadroomScan(model, dtype, margin_bits, len(records), sampling, tuple(modules))
