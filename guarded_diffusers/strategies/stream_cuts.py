"""A component's scale-invariant cuts at run time: the bake's tracer on the failing call, cached.

The bake traces float32 calibration calls (``baking.graph``); here the component's very call that
overflowed is traced once more, in the working dtype. Which tensors must share a scale follows
from the operations, not from their values, so a float16 trace full of inf gives the float32
trace's cuts (tested). A trace costs one forward of the component; it is kept per component object
and reused while the component has the same modules and parameters and is called with inputs of
the same structure (a ControlNet residual among them pins the stream), so the later incidents of a
call and later calls trace nothing. Fusing QKV projections or loading a LoRA changes the modules,
and the next overflow is traced again.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..baking.apply import scaling_for
from ..baking.calibrate import tracing
from ..baking.choose import Choice
from ..baking.cuts import Cut, CutFinder
from ..core.compiled import eager_call, eager_module
from ..core.context import entering
from ..core.locate import ModuleCall

# Per component: the signature it was traced with and what the trace found.
_TRACED: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, ComponentCuts]] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class ComponentCuts:
    """The cuts of one component (qualified names from ``name``) and each layer's (input, output) cut."""

    name: str
    cuts: list[Cut]
    layers: dict[str, tuple[int | None, int | None]]

    def written_by(self, layer: str) -> Cut | None:
        """The cut ``layer``'s output belongs to."""
        index = self.layers.get(layer, (None, None))[1]
        return None if index is None else self.cuts[index]

    def read_by(self, norm: str) -> Cut | None:
        """The cut a normalisation reads."""
        return next((cut for cut in self.cuts if norm in cut.readers), None)

    def passed_on(self, module: str) -> list[Cut]:
        """Cuts written inside ``module`` and read outside it: the streams a block passes on."""
        inside = [self.written_by(layer) for layer in self.layers if layer.startswith(module + ".")]
        found = {id(cut): cut for cut in inside if cut is not None}
        return [cut for cut in found.values() if any(not r.startswith(module + ".") for r in cut.readers)]

    def exponents(self, module: nn.Module, cuts: Iterable[Cut], k: int) -> dict[str, int]:
        """``{qualified tensor name: exponent}`` scaling each of ``cuts`` of ``module`` (the traced
        component, not held here: the cache must not keep it alive) by ``2**-k`` (the bake's rules:
        a writer's weight and bias ``2**-k``, a reader layer's weight ``2**k``), one name per tensor.

        ``ValueError`` when a tensor shared by several modules would need two exponents.
        """
        choices = [Choice(cut, k, k) for cut in cuts]
        scaling = scaling_for(_as_pipeline(self.name, module), choices, self.layers)
        component = self.name.partition(".")[0]
        names = [f"{component}.{aliases[0]}" for aliases in scaling.aliases.get(component, [])]
        return {name: exponent for name, (_, exponent) in zip(names, scaling.tensors, strict=True)}


def _as_pipeline(name: str, module: nn.Module) -> Any:
    """What ``scaling_for`` resolves qualified names on: ``module`` at its path (``vae.decoder``)."""
    head, _, rest = name.partition(".")
    holder = module
    for part in reversed(rest.split(".") if rest else []):
        outer = nn.Module()
        outer.add_module(part, holder)
        holder = outer
    return types.SimpleNamespace(**{head: holder})


def _signature(module: nn.Module, call: ModuleCall) -> Hashable:
    """What the cuts depend on: the module objects and parameters by name, the inputs' structure."""
    leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
    return (
        tuple((name, id(child)) for name, child in module.named_modules(remove_duplicate=False)),
        tuple((name, id(tensor)) for name, tensor in module.named_parameters(remove_duplicate=False)),
        repr(spec),
        tuple(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in leaves),
    )


def component_cuts(call: ModuleCall) -> ComponentCuts:
    """The cuts of ``call``'s component (the stage's outermost call), traced on its inputs, or cached."""
    module = eager_module(call.module)
    signature = _signature(module, call)
    held = _TRACED.get(module)
    if held is not None and held[0] == signature:
        return held[1]
    finder = CutFinder()
    # Outside the guarded call: the guard's block watch (an ``aminmax`` the tracer would take for a
    # reader of the stream) and hook-only fixes stay out of the trace.
    with torch.no_grad(), entering(None), tracing({call.name: module}, finder):
        eager_call(call.module, call.args, call.kwargs)
    cuts, layers = finder.cuts()
    found = ComponentCuts(call.name, cuts, layers)
    _TRACED[module] = (signature, found)
    return found
