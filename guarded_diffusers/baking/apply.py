"""Turn chosen exponents into per-tensor powers of two, and apply them to a pipeline in place.

A layer reading cut ``a`` and writing cut ``b`` gets ``weight * 2**(k_a - k_b)`` and
``bias * 2**-k_b``; a tensor used directly in a cut (a position embedding added to the stream)
gets ``2**-k``. A parameter shared by several modules (tied embeddings) must get one factor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .choose import FLOAT16_SMALLEST_NORMAL, Choice

FLOAT16_SMALLEST_SUBNORMAL = 2.0**-24


@dataclasses.dataclass
class Scaling:
    """Power-of-two exponents per tensor, by component and the tensor's names within it."""

    exponents: dict[str, dict[str, int]]
    tensors: list[tuple[torch.Tensor, int]]
    # Per component, the names of each scaled tensor (tied parameters have several).
    aliases: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)

    def apply(self, sign: int = 1) -> None:
        """Scale in place (``sign=-1`` undoes it; exact in float32)."""
        with torch.no_grad():
            for tensor, exponent in self.tensors:
                tensor.mul_(2.0 ** (sign * exponent))

    def subnormals(self) -> dict[str, int]:
        """Scaled weights that become float16 subnormals or zero, against the unscaled ones."""
        return subnormal_counts(self.tensors)


def subnormal_counts(scaled: Iterable[tuple[torch.Tensor, int]]) -> dict[str, int]:
    """``Scaling.subnormals`` for (unscaled tensor, exponent) pairs, taken one at a time."""
    counts = {"subnormal_before": 0, "subnormal_after": 0, "zero_after": 0, "scaled_elements": 0}
    for tensor, exponent in scaled:
        values = tensor.detach().float().abs()
        after = values * 2.0**exponent
        nonzero = values > 0
        counts["subnormal_before"] += int((nonzero & (values < FLOAT16_SMALLEST_NORMAL)).sum())
        counts["subnormal_after"] += int((nonzero & (after < FLOAT16_SMALLEST_NORMAL)).sum())
        counts["zero_after"] += int((nonzero & (after < FLOAT16_SMALLEST_SUBNORMAL / 2)).sum())
        counts["scaled_elements"] += tensor.numel()
    return counts


def _module(pipe: Any, name: str) -> nn.Module:
    component, _, path = name.partition(".")
    root = getattr(pipe, component)
    return root.get_submodule(path) if path else root


def _parameter(pipe: Any, name: str) -> torch.Tensor:
    component, _, path = name.partition(".")
    return getattr(pipe, component).get_parameter(path) if path else getattr(pipe, component)


def _aliases(pipe: Any, component: str) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    root = getattr(pipe, component)
    for name, tensor in [
        *root.named_parameters(remove_duplicate=False),
        *root.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(tensor), []).append(name)
    return names


def scaling_for(
    pipe: Any, choices: Iterable[Choice], layers: dict[str, tuple[int | None, int | None]]
) -> Scaling:
    """Per-tensor exponents for ``choices`` on ``pipe``'s modules; ``layers`` maps each layer to its
    (input cut, output cut) indices."""
    choices = list(choices)
    k_of = {choice.cut.index: choice.k for choice in choices}
    wanted: dict[int, tuple[torch.Tensor, int, str]] = {}

    def want(tensor: torch.Tensor, exponent: int, name: str) -> None:
        if exponent == 0:
            return
        previous = wanted.get(id(tensor))
        if previous is not None and previous[1] != exponent:
            raise ValueError(f"{name} is shared by modules that need different scales ({previous[2]})")
        wanted[id(tensor)] = (tensor, exponent, name)

    for layer, (cut_in, cut_out) in layers.items():
        k_in, k_out = k_of.get(cut_in, 0), k_of.get(cut_out, 0)
        if not (k_in or k_out):
            continue
        module = _module(pipe, layer)
        want(module.weight, k_in - k_out, f"{layer}.weight")
        if getattr(module, "bias", None) is not None:
            want(module.bias, -k_out, f"{layer}.bias")
    for choice in choices:
        for name in choice.cut.params:
            want(_parameter(pipe, name), -choice.k, name)
    exponents: dict[str, dict[str, int]] = {}
    groups: dict[str, list[list[str]]] = {}
    alias_cache: dict[str, dict[int, list[str]]] = {}
    for tensor, exponent, name in wanted.values():
        component, _, path = name.partition(".")
        names = alias_cache.setdefault(component, _aliases(pipe, component)).get(id(tensor), [path])
        groups.setdefault(component, []).append(names)
        for alias in names:
            exponents.setdefault(component, {})[alias] = exponent
    return Scaling(exponents, [(tensor, exponent) for tensor, exponent, _ in wanted.values()], groups)
