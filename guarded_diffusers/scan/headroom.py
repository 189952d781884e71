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

The residual stream is recorded on its own: each repeated block's output (Flux's
``transformer_blocks`` and ``single_transformer_blocks``, T5's and CLIP's layers, the VAE's
up/down blocks; ``stream.residual_blocks``), counting only the hidden states the block passes on
(``stream.stream_tensors``: T5's position bias, which carries the attention mask, is left out).
Massive activations live there: a few channels that the blocks add up and carry until a
normalisation divides them away, so the stream itself can pass the working dtype's range while
every normalised matmul fits. A **stream span** is a run of consecutive blocks whose stream is at
risk.

The scan also notes, for every module, the parameter bytes a float32 island on it would add in
the working dtype, so that the plan can keep within the guard's memory budget.

The running maxima stay on the device during a sample (a few reductions per module call) and
are read to the host once per sample.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

from ..core.checks import absmax_on_device, floating_tensors
from ..core.stream import residual_blocks, saturation_limit, stream_tensors

# The components recorded, in the order the report and chart list them (a pipeline has some of
# them); modules are named "component.path" as in the guard's reports.
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "controlnet", "transformer", "unet")
FORMAT = "guarded-diffusers/headroom-report"
# 3: residual-stream blocks recorded apart ("stream"), island costs and the memory budget.
VERSION = 3
# The layers the ``residual`` strategy can make compute in float32.
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    stream_absmax: dict[str, float] = dataclasses.field(default_factory=dict)
    # Residual-stream blocks in the order they first finished in this sample: the stream's order.
    stream_order: tuple[str, ...] = ()


def _floating(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(floating elements, bytes of the other tensors), each tensor counted once."""
    unique = {id(tensor): tensor for tensor in tensors}.values()
    elements = sum(tensor.numel() for tensor in unique if tensor.is_floating_point())
    other = sum(tensor.numel() * tensor.element_size() for tensor in unique if not tensor.is_floating_point())
    return elements, other


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """What the scan reads from the loaded modules once: which are layers and residual-stream blocks
    (in stream order), and how many floating elements each holds (what a float32 island widens)."""

    layers: frozenset[str] = frozenset()
    stream_blocks: tuple[str, ...] = ()  # in the model's own order (``residual_blocks``)
    floating_elements: dict[str, int] = dataclasses.field(default_factory=dict)
    total_floating_elements: int = 0
    other_bytes: int = 0

    def parameter_bytes(self, dtype: torch.dtype) -> int:
        """The components' parameter and buffer bytes with every floating tensor in ``dtype``.

        Models that keep some weights in float32 (transformers' T5 ``wo``) hold a little more, so the
        guard's budget is at least this fraction of it: planning against it is conservative.
        """
        return self.total_floating_elements * _itemsize(dtype) + self.other_bytes

    def float32_extra_bytes(self, name: str, dtype: torch.dtype) -> int | None:
        """Bytes a float32 island on ``name`` adds over ``dtype`` weights; weights a model keeps in
        float32 add nothing, so this is an upper bound."""
        elements = self.floating_elements.get(name)
        return None if elements is None else elements * max(0, 4 - _itemsize(dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


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
        self._streams = _RunningMax()
        self._stream_order: dict[str, None] = {}
        self._calls: collections.Counter[str] = collections.Counter()
        self._handles = []
        layers: set[str] = set()
        stream_blocks: list[str] = []
        elements: dict[str, int] = {}
        roots: list[nn.Module] = []
        for component in COMPONENTS:
            root = getattr(pipeline, component, None)
            if not isinstance(root, nn.Module):
                continue
            roots.append(root)
            names = {
                id(module): f"{component}.{path}" if path else component
                for path, module in root.named_modules()
            }
            blocks = [names[id(block)] for block in residual_blocks(root) if id(block) in names]
            block_names = set(blocks)
            stream_blocks += blocks
            for path, module in root.named_modules():
                name = f"{component}.{path}" if path else component
                self.classes[name] = type(module).__name__
                elements[name] = _floating(_state(module))[0]
                if isinstance(module, LAYERS):
                    layers.add(name)
                hook = self._hook(name, stream=name in block_names)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        total, other = _floating(tensor for root in roots for tensor in _state(root))
        self.layout = ModelLayout(frozenset(layers), tuple(stream_blocks), elements, total, other)

    def _hook(self, name: str, stream: bool) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._outputs.raise_to(name, absmax_on_device(output))
            self._inputs.raise_to(name, input_absmax_on_device((args, kwargs)))
            if stream:
                self._streams.raise_to(name, absmax_on_device(stream_tensors(module, output)))
                self._stream_order.setdefault(name)
            self._calls[name] += 1

        return record

    def take(self, index: int) -> SampleRecord:
        """The sample just run, read to the host; the recorder starts afresh."""
        record = SampleRecord(
            index,
            self._outputs.read(),
            self._inputs.read(),
            dict(self._calls),
            self._streams.read(),
            tuple(self._stream_order),
        )
        self._calls.clear()
        self._stream_order.clear()
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
    """One module's merged statistics; ``at_risk`` when its output or input headroom is under the margin.

    ``layer``: a Linear or convolution (what the ``residual`` strategy can change); ``residual_block``:
    a block of the residual stream (its stream is in ``HeadroomScan.stream``); ``float32_extra_bytes``:
    what a float32 island on it would add to the working dtype's parameter bytes (``None``: unknown).
    """

    module: str
    module_class: str
    calls: int
    absmax: float
    headroom_bits: float
    input_absmax: float
    input_headroom_bits: float
    at_risk: bool
    layer: bool = False
    residual_block: bool = False
    float32_extra_bytes: int | None = None

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
            "layer": self.layer,
            "residual_block": self.residual_block,
            "float32_extra_bytes": self.float32_extra_bytes,
        }


@dataclasses.dataclass(frozen=True)
class StreamBlock:
    """The residual stream after one block: the largest hidden state it passes on.

    ``owner`` is the outermost module that ran around it (the component, or the VAE's encoder or
    decoder): the stream's extent. ``saturated``: at or past the band where the libraries clip
    (``stream.saturation_limit``), where a float16 run would be cut or non-finite.
    """

    block: str
    owner: str
    module_class: str
    calls: int
    absmax: float
    headroom_bits: float
    at_risk: bool
    saturated: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "owner": self.owner,
            "module_class": self.module_class,
            "calls": self.calls,
            "absmax": _json_absmax(self.absmax),
            "headroom_bits": _json_bits(self.headroom_bits),
            "at_risk": self.at_risk,
            "saturated": self.saturated,
        }


@dataclasses.dataclass(frozen=True)
class StreamSpan:
    """Consecutive blocks of one stream whose output is at risk: the stream carries out-of-range values."""

    owner: str
    blocks: tuple[str, ...]
    absmax: float
    headroom_bits: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "first": self.blocks[0],
            "last": self.blocks[-1],
            "blocks": list(self.blocks),
            "absmax": _json_absmax(self.absmax),
            "headroom_bits": _json_bits(self.headroom_bits),
        }


def stream_spans(blocks: Iterable[StreamBlock]) -> tuple[StreamSpan, ...]:
    """Runs of consecutive at-risk blocks of one owner, in stream order."""
    runs: list[list[StreamBlock]] = []
    previous: StreamBlock | None = None
    for block in blocks:
        if block.at_risk:
            if previous is not None and previous.at_risk and previous.owner == block.owner:
                runs[-1].append(block)
            else:
                runs.append([block])
        previous = block
    return tuple(
        StreamSpan(
            run[0].owner,
            tuple(block.block for block in run),
            max(block.absmax for block in run),
            min(block.headroom_bits for block in run),
        )
        for run in runs
    )


@dataclasses.dataclass(frozen=True)
class HeadroomScan:
    """Merged statistics of a scan, modules sorted by their lowest headroom, then by name.

    ``stream`` holds the residual-stream blocks in stream order. ``parameter_bytes`` is the
    components' parameter bytes in ``dtype`` and ``max_extra_memory`` the fraction of it that plan
    fixes may add (the guard's ``guard_max_extra_memory``); ``None``: unknown, no limit.
    """

    model: str
    dtype: str
    margin_bits: float
    samples: int
    sampling: dict[str, Any]
    modules: tuple[ModuleHeadroom, ...]
    stream: tuple[StreamBlock, ...] = ()
    parameter_bytes: int | None = None
    max_extra_memory: float | None = None

    @property
    def dtype_max(self) -> float:
        return torch.finfo(getattr(torch, self.dtype)).max

    @property
    def at_risk(self) -> tuple[ModuleHeadroom, ...]:
        return tuple(module for module in self.modules if module.at_risk)

    @property
    def spans(self) -> tuple[StreamSpan, ...]:
        return stream_spans(self.stream)

    @property
    def budget_bytes(self) -> int | None:
        """Bytes the plan's fixes may add, as the guard computes it; ``None`` when either part is unknown."""
        if self.parameter_bytes is None or self.max_extra_memory is None:
            return None
        return int(self.max_extra_memory * self.parameter_bytes)

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
            "memory": {
                "parameter_bytes": self.parameter_bytes,
                "max_extra_memory": self.max_extra_memory,
                "budget_bytes": self.budget_bytes,
            },
            "at_risk": [module.module for module in self.at_risk],
            "stream": {
                "saturation_limit": saturation_limit(getattr(torch, self.dtype)),
                "at_risk": [block.block for block in self.stream if block.at_risk],
                "spans": [span.to_dict() for span in self.spans],
                "blocks": [block.to_dict() for block in self.stream],
            },
            "modules": [module.to_dict() for module in self.modules],
        }


def _maxima(per_sample: Iterable[dict[str, float]]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for sample in per_sample:
        for name, value in sample.items():
            peaks[name] = max(peaks.get(name, value), value)
    return peaks


def _owner(name: str, recorded: Collection[str]) -> str:
    """The outermost module that ran around ``name`` (itself if none did)."""
    parts = name.split(".")
    return next(
        (".".join(parts[:length]) for length in range(1, len(parts)) if ".".join(parts[:length]) in recorded),
        name,
    )


def merge(
    records: Iterable[SampleRecord],
    classes: dict[str, str],
    *,
    model: str,
    dtype: str,
    margin_bits: float,
    sampling: dict[str, Any],
    layout: ModelLayout | None = None,
    max_extra_memory: float | None = None,
) -> HeadroomScan:
    """Largest magnitudes and total calls per module over ``records``, whichever process recorded them.

    ``layout`` (the recorder's) adds layers, residual-stream blocks and island costs.
    """
    layout = layout or ModelLayout()
    records = sorted(records, key=lambda record: record.index)
    outputs = _maxima(record.absmax for record in records)
    inputs = _maxima(record.input_absmax for record in records)
    streams = _maxima(record.stream_absmax for record in records)
    calls = collections.Counter()
    for record in records:
        calls.update(record.calls)
    torch_dtype = getattr(torch, dtype)
    dtype_max = torch.finfo(torch_dtype).max
    modules = []
    for name in sorted(outputs.keys() | inputs.keys()):
        absmax, input_absmax = outputs.get(name, 0.0), inputs.get(name, 0.0)
        bits, input_bits = headroom_bits(absmax, dtype_max), headroom_bits(input_absmax, dtype_max)
        at_risk = min(bits, input_bits) < margin_bits
        modules.append(
            ModuleHeadroom(
                name,
                classes[name],
                calls[name],
                absmax,
                bits,
                input_absmax,
                input_bits,
                at_risk,
                layer=name in layout.layers,
                residual_block=name in layout.stream_blocks,
                float32_extra_bytes=layout.float32_extra_bytes(name, torch_dtype),
            )
        )
    modules.sort(key=lambda module: (module.lowest_bits, module.module))
    recorded = outputs.keys() | inputs.keys()
    limit = saturation_limit(torch_dtype)
    stream = []
    # Execution order (the first sample's, then blocks first seen later), else the model's own order.
    order = dict.fromkeys(name for record in records for name in record.stream_order)
    order.update(dict.fromkeys(layout.stream_blocks))
    for name in order:
        if name not in streams or name not in layout.stream_blocks:
            continue  # never ran
        bits = headroom_bits(streams[name], dtype_max)
        saturated = not math.isfinite(streams[name]) or streams[name] >= limit
        stream.append(
            StreamBlock(
                name,
                _owner(name, recorded),
                classes[name],
                calls[name],
                streams[name],
                bits,
                bits < margin_bits,
                saturated,
            )
        )
    return HeadroomScan(
        model,
        dtype,
        margin_bits,
        len(records),
        sampling,
        tuple(modules),
        tuple(stream),
        layout.parameter_bytes(torch_dtype) if layout.floating_elements else None,
        max_extra_memory,
    )
