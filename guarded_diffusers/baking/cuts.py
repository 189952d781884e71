"""Scale-invariant cuts of a pipeline, merged over every traced component call.

A cut is a class of tensors that may all take one scale ``2**-k``: every tensor of it is read
only by normalisations, by layers (whose weights can absorb the factor) or by operations that let
a power of two through, and nothing outside the component sees it. Classes are named across
calls by the modules around them (``out:`` a layer's output, ``in:`` its input, ``norm:`` a
normalisation reading it, ``param:`` a tensor used directly), so the same stream traced at every
denoising step is one cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from .graph import CallGraph


@dataclasses.dataclass
class Cut:
    """One scale class: its readers and writers, what pins it (if anything), measured magnitudes."""

    name: str
    readers: list[str]
    writers: list[str]
    passers: list[str]
    params: list[str]
    peak: float
    pinned: str | None
    index: int = -1
    # Per normalisation reading it: the smallest per-token variance (or mean square) seen, and its eps.
    smallest: dict[str, float] = dataclasses.field(default_factory=dict)
    eps: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def scalable(self) -> bool:
        return self.pinned is None and bool(self.readers)

    @property
    def smallest_rms(self) -> float:
        return math.sqrt(min(self.smallest.values())) if self.smallest else math.inf


class _Anchors:
    """Union-find over anchor strings, with each root's peak and first pin reason."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.order: dict[str, int] = {}
        self.peak: dict[str, float] = {}
        self.pinned: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        self.order.setdefault(key, len(self.order))
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, keys: list[str], peak: float, pinned: str | None) -> None:
        roots = sorted({self.find(key) for key in keys}, key=self.order.__getitem__)
        root = roots[0]
        for other in roots[1:]:
            self.parent[other] = root
            self.peak[root] = max(self.peak.get(root, 0.0), self.peak.pop(other, 0.0))
            if other in self.pinned:
                self.pinned.setdefault(root, self.pinned.pop(other))
        self.peak[root] = max(self.peak.get(root, 0.0), peak)
        if pinned is not None:
            self.pinned.setdefault(root, pinned)


class CutFinder:
    """Accumulates traced calls; ``cuts()`` gives the merged classes and each layer's input/output cut."""

    def __init__(self) -> None:
        self._anchors = _Anchors()
        self.norm_stats: dict[str, float] = {}
        self.norm_eps: dict[str, float] = {}

    def add(self, graph: CallGraph) -> None:
        members: dict[int, list[str]] = {}
        for layer in graph.layers:
            members.setdefault(graph.find(layer.output), []).append(f"out:{layer.module}")
            if layer.input is not None:
                members.setdefault(graph.find(layer.input), []).append(f"in:{layer.module}")
        for name, node in graph.norms:
            members.setdefault(graph.find(node), []).append(f"norm:{name}")
        for node, name in graph.params.items():
            members.setdefault(graph.find(node), []).append(f"param:{name}")
        peaks: dict[int, float] = {}
        present = [(graph.find(node), peak) for node, peak in enumerate(graph.peaks) if peak is not None]
        if present:
            values = torch.stack([peak for _, peak in present]).cpu().tolist()
            for (root, _), value in zip(present, values, strict=True):
                peaks[root] = max(peaks.get(root, 0.0), value if math.isfinite(value) else math.inf)
        for root, keys in members.items():
            self._anchors.join(keys, peaks.get(root, 0.0), graph.pins.get(root))

    def add_norm_stats(self, stats: dict[str, torch.Tensor], eps: dict[str, float]) -> None:
        """The smallest per-token statistic each norm saw in a call (one host read), and its eps."""
        if not stats:
            return
        values = dict(zip(stats, torch.stack(list(stats.values())).cpu().tolist(), strict=True))
        for name, value in values.items():
            self.norm_stats[name] = min(self.norm_stats.get(name, math.inf), value)
        self.norm_eps.update(eps)

    def cuts(self) -> tuple[list[Cut], dict[str, tuple[int | None, int | None]]]:
        """Every class with an anchor, in first-seen order, and per layer (input cut, output cut) indices."""
        anchors = self._anchors
        groups: dict[str, list[str]] = {}
        for key in sorted(anchors.parent, key=anchors.order.__getitem__):
            groups.setdefault(anchors.find(key), []).append(key)
        cuts: list[Cut] = []
        index_of: dict[str, int] = {}
        for root, keys in groups.items():
            kinds = _split(keys)
            readers = kinds["norm"]
            cut = Cut(
                name=readers[0] if readers else (kinds["out"] or kinds["in"] or kinds["param"])[0],
                readers=readers,
                writers=kinds["out"],
                passers=kinds["in"],
                params=kinds["param"],
                peak=anchors.peak.get(root, 0.0),
                pinned=anchors.pinned.get(root),
                smallest={name: self.norm_stats[name] for name in readers if name in self.norm_stats},
                eps={name: self.norm_eps.get(name, 0.0) for name in readers},
                index=len(cuts),
            )
            index_of[root] = len(cuts)
            cuts.append(cut)
        layers: dict[str, tuple[int | None, int | None]] = {}
        for key in anchors.parent:
            kind, _, name = key.partition(":")
            if kind in ("in", "out"):
                before = layers.get(name, (None, None))
                index = index_of[anchors.find(key)]
                layers[name] = (index, before[1]) if kind == "in" else (before[0], index)
        return cuts, layers


def _split(keys: Iterable[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"out": [], "in": [], "norm": [], "param": []}
    for key in keys:
        kind, _, name = key.partition(":")
        kinds[kind].append(name)
    return kinds
