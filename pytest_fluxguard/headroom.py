"""How much headroom each baked cut had in one call: the peak of its tensors, in the order they ran.

A cut's tensors are what its writers output and what its readers (the normalisations that make it
scale-free) take in. Each hooked call costs one ``aminmax`` on the device, kept there; the reading
is one host read per call. The first value at or past its dtype's saturation limit names the cut
whose headroom ran out; a NaN that reaches a cut before any value ran out came from outside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from guarded_diffusers import BakedCut, saturation_limit

from .peaks import OVERFLOWED


@dataclasses.dataclass(frozen=True)
class CutPeak:
    """One cut's largest magnitude (inf or NaN when not finite) in the dtype it ran in."""

    cut: BakedCut
    peak: float
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def maximum(self) -> float:
        return torch.finfo(self.dtype).max

    @property
    def ran_out(self) -> bool:
        """At or past where the dtype saturates (diffusers and transformers clip there), or not finite."""
        return not self.peak < saturation_limit(self.dtype)

    @property
    def ratio(self) -> float:
        """The peak over the dtype's maximum; ``OVERFLOWED`` when not finite, as the search expects."""
        return self.peak / self.maximum if math.isfinite(self.peak) else OVERFLOWED

    @property
    def headroom_bits(self) -> float:
        return math.log2(self.maximum / self.peak) if self.peak > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class Headroom:
    """Every cut's peak over one call, and the first value that ran out (the call's order)."""

    peaks: dict[str, CutPeak]
    first_out: CutPeak | None

    @property
    def ran_out(self) -> CutPeak | None:
        """The cut whose headroom ran out first; None when nothing did, or NaN came first."""
        first = self.first_out
        return first if first is not None and not math.isnan(first.peak) else None

    @property
    def closest(self) -> CutPeak | None:
        """The cut that came closest to its dtype's maximum."""
        return max(self.peaks.values(), key=lambda found: found.ratio, default=None)

    def ratios(self) -> dict[str, float]:
        """Each cut's peak over its dtype's maximum, for hypothesis' targeted search."""
        return {name: found.ratio for name, found in self.peaks.items()}


def cut_modules(pipe: Any, cuts: Sequence[BakedCut]) -> list[tuple[BakedCut, str, Any]]:
    """(cut, "writer" or "reader", module) for every writer and reader of ``cuts`` in ``pipe``.

    A LookupError names a module the bake recorded that the pipeline does not have.
    """
    found = []
    for cut in cuts:
        for role, names in (("writer", cut.writers), ("reader", cut.readers)):
            for name in names:
                component, _, path = name.partition(".")
                try:
                    module = pipe.components[component].get_submodule(path)
                except (KeyError, AttributeError):
                    raise LookupError(
                        f"the bake's cut {cut.name} names {name}, which this pipeline does not have"
                    ) from None
                found.append((cut, role, module))
    return found


class CutMeter:
    """Records, during ``measuring(pipe)``, the peak of every baked cut's tensors in call order."""

    def __init__(self, cuts: Sequence[BakedCut]) -> None:
        self.cuts = tuple(cuts)
        self._records: list[tuple[BakedCut, torch.dtype, torch.Tensor]] = []

    def _record(self, cut: BakedCut, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            low, high = torch.aminmax(tensor.detach())
            self._records.append((cut, tensor.dtype, torch.maximum(high, -low)))

    @contextlib.contextmanager
    def measuring(self, pipe: Any) -> Iterator[CutMeter]:
        """Hooks on the cuts' writers (outputs) and readers (inputs) in ``pipe``, removed on exit."""
        self._records = []
        handles = []
        for cut, role, module in cut_modules(pipe, self.cuts):
            if role == "writer":
                handles.append(module.register_forward_hook(self._after_writer(cut)))
            else:
                handles.append(module.register_forward_pre_hook(self._before_reader(cut)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _after_writer(self, cut: BakedCut) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            self._record(cut, output[0] if isinstance(output, tuple) else output)

        return hook

    def _before_reader(self, cut: BakedCut) -> Any:
        def hook(module: Any, args: tuple) -> None:
            if args:
                self._record(cut, args[0])

        return hook

    def read(self) -> Headroom:
        """The call's peaks, in one host read."""
        records, self._records = self._records, []
        if not records:
            return Headroom({}, None)
        device = records[0][2].device
        values = torch.stack([peak.float().to(device) for _, _, peak in records]).tolist()
        peaks: dict[str, CutPeak] = {}
        first_out = None
        for (cut, dtype, _), value in zip(records, values, strict=True):
            found = CutPeak(cut, value, dtype)
            if first_out is None and found.ran_out:
                first_out = found
            known = peaks.get(cut.name)
            if known is None or _rank(found) > _rank(known):
                peaks[cut.name] = found
        return Headroom(peaks, first_out)


def _rank(found: CutPeak) -> tuple[bool, float]:
    """NaN above inf above any finite ratio."""
    return math.isnan(found.peak), found.ratio if not math.isnan(found.peak) else 0.0
