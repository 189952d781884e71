"""The dataflow of one component call, traced while it runs: which tensors must share one scale.

A ``TorchFunctionMode`` sees every torch operation of a real forward (Python control flow,
attention processors and all), so nothing is listed per model. Linear layers, convolutions,
embeddings and normalisations are seen as whole modules (their hooks suspend the mode); every
other operation adds a constraint between the scale classes of its tensors:

- additions, concatenations, views, clamps, interpolation: one class (a power of two passes);
- a product: the class of the factor that depends on the stream, when the other is pinned;
- attention: the output shares V's class, Q and K are pinned (softmax is not homogeneous);
- anything else (GELU, softmax, matmul, exp, an added constant): every tensor is pinned.

A pinned class must keep scale 1. The component's inputs and outputs are pinned too: whatever
reads them lies outside (a pipeline reading CLIP's raw hidden states, a ControlNet residual).
A normalisation's input may take any scale, its output is pinned. A layer's output is a class
of its own: scaling its weight by ``2**(k_in - k_out)`` and its bias by ``2**-k_out`` gives any
output scale, whatever the input's. ``solve`` resolves the products once all unions are known.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..core.checks import tensor_absmax

# Modules seen whole: their output scale follows their weights (layers) or is 1 (norms).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding)
_UNION_ALL = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "where", "__setitem__", "copy_",
}  # fmt: skip
_UNION_FIRST = {
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze", "chunk",
    "split", "split_with_sizes", "tensor_split", "hsplit", "vsplit", "unbind", "__getitem__",
    "contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type", "type_as", "expand",
    "expand_as", "repeat", "narrow", "select",
    "clamp", "clip", "clamp_", "clip_", "dropout", "interpolate", "pad", "neg", "__neg__", "movedim",
    "moveaxis", "flip", "roll", "__get__", "detach", "view_as", "reshape_as", "t", "swapaxes",
    "pixel_shuffle", "pixel_unshuffle", "avg_pool2d", "max_pool2d", "sum", "mean", "_unflatten",
}  # fmt: skip
# Of those, the ones a non-zero constant operand makes affine rather than linear.
_AFFINE = {
    "add",
    "__add__",
    "__radd__",
    "sub",
    "__sub__",
    "__rsub__",
    "add_",
    "sub_",
    "__iadd__",
    "__isub__",
    "where",
}
_PRODUCTS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__"}
_ATTENTION = {"scaled_dot_product_attention"}


def is_norm(module: nn.Module) -> bool:
    """A scale-invariant normalisation seen whole: LayerNorm, GroupNorm, RMSNorm (any library's)."""
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm):
        return True
    name = type(module).__name__
    leaf = next(module.children(), None) is None
    return leaf and (name.endswith("RMSNorm") or name.endswith("LayerNorm"))


def norm_epsilon(module: nn.Module) -> float:
    return float(getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 0.0)


def norm_statistic(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """The smallest quantity the norm adds eps to: per-token variance (LayerNorm, per group for
    GroupNorm) or mean square (RMSNorm), as a float32 device scalar."""
    x = tensor.detach().float()
    if isinstance(module, nn.GroupNorm):
        return x.reshape(x.shape[0], module.num_groups, -1).var(dim=-1, unbiased=False).min()
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        return x.var(dim=dims, unbiased=False).min()
    return x.square().mean(dim=-1).min()


@dataclasses.dataclass
class Layer:
    """A layer call: its module name and the nodes of its input and output."""

    module: str
    input: int | None
    output: int


@dataclasses.dataclass
class CallGraph:
    """Nodes (tensors) and constraints of one component call; ``solve`` turns them into classes."""

    parent: list[int] = dataclasses.field(default_factory=list)
    peaks: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    pins: dict[int, str] = dataclasses.field(default_factory=dict)
    products: list[tuple[int, int, int, str]] = dataclasses.field(default_factory=list)
    layers: list[Layer] = dataclasses.field(default_factory=list)
    norms: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    params: dict[int, str] = dataclasses.field(default_factory=dict)
    numel: list[int] = dataclasses.field(default_factory=list)

    def new(self, tensor: torch.Tensor | None, measure: bool = True) -> int:
        """A node for ``tensor``, with its peak (a device scalar) unless ``measure`` is off."""
        self.parent.append(len(self.parent))
        self.numel.append(tensor.numel() if tensor is not None else 0)
        peak = None
        if measure and tensor is not None and tensor.is_floating_point() and tensor.numel():
            peak = tensor_absmax(tensor)
        self.peaks.append(peak)
        return len(self.parent) - 1

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, *nodes: int | None) -> None:
        present = [self.find(node) for node in nodes if node is not None]
        for node in present[1:]:
            root, other = self.find(present[0]), self.find(node)
            if root != other:
                self.parent[other] = root
                if other in self.pins:
                    self.pins.setdefault(root, self.pins.pop(other))

    def pin(self, node: int | None, reason: str) -> None:
        if node is not None:
            self.pins.setdefault(self.find(node), reason)

    def pinned(self, node: int | None) -> bool:
        return node is None or self.find(node) in self.pins

    def solve(self) -> None:
        """Resolve products: a pinned factor lets the other pass; otherwise the broadcast one is pinned."""
        open_products = list(self.products)
        while open_products:
            remaining = []
            for a, b, out, op in open_products:
                if self.pinned(a):
                    self.union(out, b)
                elif self.pinned(b):
                    self.union(out, a)
                else:
                    remaining.append((a, b, out, op))
            if len(remaining) == len(open_products):  # no pinned factor anywhere: decide one
                a, b, out, op = remaining.pop(0)
                if self.numel[a] != self.numel[b]:
                    small, large = (a, b) if self.numel[a] < self.numel[b] else (b, a)
                    self.pin(small, f"{op}: broadcast factor")
                    self.union(out, large)
                else:
                    self.pin(a, f"{op} of two stream-dependent tensors")
                    self.pin(b, f"{op} of two stream-dependent tensors")
                    self.pin(out, f"{op} of two stream-dependent tensors")
            open_products = remaining
        self.products.clear()


class Tracer(TorchFunctionMode):
    """Records the dataflow of calls to ``root`` (named ``prefix``) into a fresh ``CallGraph`` each."""

    def __init__(self, root: nn.Module, prefix: str) -> None:
        super().__init__()
        self.root, self.prefix = root, prefix
        self.graph = CallGraph()
        self._nodes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._suspended = 0
        # Tensors by id, kept weakly and checked for identity: an id outlives a tensor freed mid-call
        # (weights streamed per block, offloading hooks) and may come back as an activation's.
        self._tensor_names: dict[int, tuple[weakref.ref, str]] = {}
        persistent = set(root.state_dict(keep_vars=True))
        for name, tensor in [
            *root.named_parameters(remove_duplicate=False),
            *root.named_buffers(remove_duplicate=False),
        ]:
            saved = name in persistent or isinstance(tensor, nn.Parameter)
            self._tensor_names[id(tensor)] = (
                weakref.ref(tensor),
                f"{prefix}.{name}" + ("" if saved else " (not saved)"),
            )
        self.norm_stats: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        for path, module in root.named_modules():
            name = f"{prefix}.{path}" if path else prefix
            if isinstance(module, LAYERS):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._layer_done(name)))
            elif is_norm(module):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._norm_done(name)))

    # -- nodes ------------------------------------------------------------------------------
    def node(self, tensor: torch.Tensor, create: bool = True, measure: bool = True) -> int | None:
        """The node of ``tensor``; a new one (with its peak unless ``measure`` is off) if unseen."""
        key = id(tensor)
        ref = self._refs.get(key)
        if ref is not None and ref() is tensor:
            return self._nodes[key]
        if not create:
            return None
        node = self.graph.new(tensor, measure)
        self._nodes[key] = node
        self._refs[key] = weakref.ref(tensor)
        name = self._name(tensor)
        if name is not None:
            self.graph.params[node] = name
            if name.endswith("(not saved)"):
                self.graph.pin(node, f"{name} is not in the weights")
        return node

    def _name(self, tensor: torch.Tensor) -> str | None:
        """The parameter or buffer name of ``tensor`` if it is one of the root's (by identity)."""
        entry = self._tensor_names.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _input_node(self, tensor: torch.Tensor) -> int:
        """An operand: a known node, a parameter, or an outside tensor (pinned)."""
        known = self.node(tensor, create=False)
        if known is not None:
            return known
        node = self.node(tensor)
        if self._name(tensor) is None:
            self.graph.pin(node, "a tensor from outside the component")
        return node

    # -- module hooks -----------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._suspended += 1

    def _first_input(self, args: tuple) -> torch.Tensor | None:
        return next((a for a in args if isinstance(a, torch.Tensor)), None)

    def _layer_done(self, name: str) -> Any:
        def done(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            source = self._first_input(args)
            node_in = self._input_node(source) if source is not None and source.is_floating_point() else None
            self.graph.layers.append(Layer(name, node_in, self.node(output)))
            self._suspended -= 1

        return done

    def _norm_done(self, name: str) -> Any:
        def done(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            source = self._first_input(args)
            node_in = self._input_node(source)
            stat = norm_statistic(module, source)
            previous = self.norm_stats.get(name)
            self.norm_stats[name] = stat if previous is None else torch.minimum(previous, stat)
            self.graph.norms.append((name, node_in))
            self.graph.pin(self.node(output, measure=False), f"output of {name}")
            self._suspended -= 1

        return done

    # -- operations -------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self._suspended:
            return result
        self._suspended += 1
        try:
            self._record(getattr(func, "__name__", str(func)), args, kwargs, result)
        finally:
            self._suspended -= 1
        return result

    def _record(self, op: str, args: tuple, kwargs: dict, result: Any) -> None:
        if op == "__setitem__":  # in place: the target takes the value's scale
            result = args[0]
        outputs = [
            t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        if not outputs:
            return  # predicates, shapes, indices: no scale to keep
        leaves = pytree.tree_leaves((args, kwargs))
        inputs = [
            self._input_node(t) for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        graph = self.graph
        # An output every operand of which gets pinned below can never be in a cut: no peak needed.
        pins_all = op not in _UNION_ALL | _UNION_FIRST | _PRODUCTS | _ATTENTION
        out_nodes = [self.node(t, measure=not pins_all) for t in outputs]
        scalars = [x for x in leaves if isinstance(x, int | float) and not isinstance(x, bool)]
        if op in _UNION_ALL:
            if op in _AFFINE and any(scalars) and len(inputs) < 2 + (op == "where"):
                for node in [*inputs, *out_nodes]:
                    graph.pin(node, f"{op} with a constant")
            graph.union(*inputs, *out_nodes)
        elif op in _UNION_FIRST and inputs:
            graph.union(inputs[0], *out_nodes)
        elif op in _PRODUCTS and inputs:
            if len(inputs) == 1:
                graph.union(inputs[0], *out_nodes)
            elif op.startswith(("div", "__truediv", "__itruediv")):
                graph.pin(inputs[1], f"{op}: divisor")
                graph.union(inputs[0], *out_nodes)
            else:
                graph.products.append((inputs[0], inputs[1], out_nodes[0], op))
        elif op in _ATTENTION and len(inputs) >= 3:
            query, key, value = inputs[:3]
            for node in (query, key, *inputs[3:]):
                graph.pin(node, f"{op}: query, key or mask")
            graph.union(value, *out_nodes)
        else:
            for node in [*inputs, *out_nodes]:
                graph.pin(node, op)

    # -- calls ------------------------------------------------------------------------------
    def call_started(self, args: tuple, kwargs: dict) -> None:
        self.graph = CallGraph()
        self._nodes.clear()
        self._refs.clear()
        for tensor in pytree.tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.graph.pin(self.node(tensor), f"an input of {self.prefix}")

    def call_finished(self, output: Any) -> CallGraph:
        for tensor in pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                node = self.node(tensor, create=False)
                self.graph.pin(node, f"returned by {self.prefix}")
        self.graph.solve()
        return self.graph

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
