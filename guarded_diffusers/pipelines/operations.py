"""Operations that change a guarded pipeline's modules: fixes lifted around each, re-applied where they fit.

A fix is state in modules that diffusers, peft and torch also change. peft changes the model under
a held fix: a targeted Linear becomes a LoRA layer holding the original as ``base_layer`` (new
qualified names), ``unload`` swaps it back, ``delete_adapters`` removes modules, and
``fuse_lora``/``unfuse_lora`` add or subtract the adapter's delta in the base weights. A dtype cast
(``pipe.to(torch.float32)``, ``pipe.transformer.half()``, ``from_pipe(..., torch_dtype=...)``)
converts a float32 island and leaves the guard's saved copies in the old dtype; fusing QKV
projections (``fuse_qkv_projections``) adds Linears that no hook of a held fix knows. A fix recorded
against the old modules then breaks the next call or cannot revert. So every such operation runs
with the fixes lifted, exactly as ``save_pretrained`` does::

    plan = guard.plan(); guard.reset(); operation(); re-apply what still fits, drop the rest

A component's own operation (``pipe.vae.to(torch.float32)``) lifts only the fixes on that component;
a pipeline's (``pipe.to(...)``, ``pipe.load_lora_weights(...)``) lifts them all. Moving to a device
without a dtype (what model offloading does at every forward) lifts nothing: fixes move with the
modules' tensors.

What still fits depends on what a fix's parameters mean:

- Structural fixes (``upcast``, ``residual``, ``clamp``, ``guidance``) say *where* the model runs
  differently, not what its weights are. They are re-applied where their module is now: under the
  same name when the object is unchanged (a block whose Linears gained LoRA layers: the island now
  covers the adapters too), on the LoRA layer that now wraps the module (so the adapter's output is
  inside the fix; ``name + ".base_layer"`` when the strategy does not take the wrapper), on the base
  layer once the wrapper is unloaded, or by name when a module of the very same class took its place.
- Every other fix (``rescale``, and third-party strategies, which the guard cannot inspect) depends
  on weight values. It is re-applied only when all its modules are the same objects under the same
  names, none of them is, holds or sits inside a LoRA layer, and the operation changed no weight
  (``fuse_lora``, ``unfuse_lora``). A rescale shift on ``proj_mlp.base_layer`` would leave the
  adapter's delta unshifted, and its consumer's compensation would multiply that delta by ``2**k``.
- A fix that measured degraded (beyond the guard's tolerance) is never re-applied: carried across
  the operation it would hold without any report saying so; the next call finds it and reports it.
- A fix on a component whose dtype the operation changed is dropped: it was made and measured for
  the old working dtype, and the new dtype is the user's new baseline (``reset()`` keeps it). If
  the component overflows in the new dtype, the next call detects and fixes it there.

A fix re-applied on the same module keeps the cost and error it measured when it was made.

A fix that no longer fits is dropped with a warning on diffusers' logger; the next call detects the
overflow again, if there still is one, and reports it. So ``reset()`` and ``save_pretrained()`` work
after any sequence of adapter operations, and no image depends on a fix measured on other weights.

Operations are watched at two levels: the pipeline's methods (``load_lora_weights``, ``fuse_lora``,
``fuse_qkv_projections``, ...; a class decorator keeps their signatures; ``to`` and ``from_pipe``
in ``guarded``) and each component's own (``pipe.transformer.add_adapter``, ``load_lora_adapter``,
``fuse_qkv_projections``, ``to``, ``half``, ...; wrapped on the instance when a guard adopts the
component). Nested operations lift once. Changing modules behind both (peft's
``inject_adapter_in_model``, ``set_tensor`` on a weight, casting a submodule) bypasses the guard:
call ``pipe.guard.reset()`` first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from diffusers.utils import logging
from torch import nn

from ..core.casting import module_dtype
from ..core.plan import PlanEntry, PrecisionPlan
from ..core.report import FixInForce

logger = logging.get_logger(f"diffusers.{__name__}")

# Strategies whose parameters say where the model runs differently, not what its weights are.
STRUCTURAL_STRATEGIES = frozenset({"upcast", "residual", "clamp", "guidance"})

# Pipeline methods that change modules, and whether they change what weights compute (fusing QKV
# projections moves the computation to new Linears: a weight-value fix no longer applies).
PIPELINE_OPERATIONS: dict[str, bool] = {
    "load_lora_weights": False,
    "set_adapters": False,
    "disable_lora": False,
    "enable_lora": False,
    "unload_lora_weights": False,
    "delete_adapters": False,
    "fuse_lora": True,
    "unfuse_lora": True,
    "fuse_qkv_projections": True,
    "unfuse_qkv_projections": True,
}
# A component's own methods that change it (diffusers' and transformers' PeftAdapterMixin, fusion),
# likewise; the casts (``CASTS``) only when they are given a dtype.
COMPONENT_OPERATIONS: dict[str, bool] = {
    "fuse_qkv_projections": True,
    "unfuse_qkv_projections": True,
    "to": False,
    "half": False,
    "float": False,
    "bfloat16": False,
    "double": False,
    "add_adapter": False,
    "load_lora_adapter": False,
    "load_adapter": False,
    "set_adapter": False,
    "set_adapters": False,
    "enable_adapters": False,
    "disable_adapters": False,
    "enable_lora": False,
    "disable_lora": False,
    "delete_adapters": False,
    "delete_adapter": False,
    "unload_lora": False,
    "fuse_lora": True,
    "unfuse_lora": True,
}

# The guards that may hold fixes on a component, per component, by id (weakly: neither keeps the
# other alive, and a guard need not be hashable).
_GUARDS: weakref.WeakKeyDictionary[nn.Module, dict[int, weakref.ref[Any]]] = weakref.WeakKeyDictionary()
# The lift in progress per guard id, so that nested operations (a pipeline method calling the
# transformer's) lift and re-apply once. Entries live only while the operation runs.
_ACTIVE: dict[int, _Lift] = {}
# What the last lift of each guard did, for ``last_outcomes``; an entry goes with its guard.
_LAST_OUTCOMES: dict[int, tuple[weakref.ref[Any], list[Outcome]]] = {}

PipelineClass = TypeVar("PipelineClass", bound=type)
# Module methods that change a dtype only when given one (``to``), or always (the others).
CASTS = frozenset({"to", "half", "float", "bfloat16", "double"})


def casts_dtype(name: str, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether the call ``name(*args, **kwargs)`` of a module or pipeline may change a dtype."""
    if name != "to":
        return name in CASTS
    given = [*args, kwargs.get("dtype"), kwargs.get("torch_dtype"), kwargs.get("tensor")]
    return any(isinstance(value, torch.dtype | torch.Tensor) for value in given)


def is_adapter_layer(module: nn.Module | None) -> bool:
    """Whether ``module`` is a peft tuner layer (a LoRA layer holding ``base_layer``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there are no adapter layers
        return False
    return isinstance(module, BaseTunerLayer)


# -- watching operations ---------------------------------------------------------------------------


def lifts_fixes_around_lora(cls: PipelineClass) -> PipelineClass:
    """Class decorator: the pipeline's LoRA methods run with its guards' fixes lifted.

    Each wrapper keeps the inherited method's signature and docstring (``functools.wraps``).
    """
    for name, changes_weights in PIPELINE_OPERATIONS.items():
        inherited = getattr(cls, name, None)
        if inherited is None or name in cls.__dict__:
            continue
        setattr(cls, name, _pipeline_operation(cls, name, inherited, changes_weights))
    return cls


def _pipeline_operation(cls: type, name: str, inherited: Callable, changes_weights: bool) -> Callable:
    @functools.wraps(inherited)
    def operation(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lifted(pipeline_guards(self), f"{type(self).__name__}.{name}", changes_weights):
            return getattr(super(cls, self), name)(*args, **kwargs)

    operation.__doc__ = (
        f"{inherited.__doc__ or ''}\n\nGuarded: the guard's fixes are lifted for the operation and "
        "re-applied where they still fit; a fix that no longer fits is dropped with a warning."
    )
    return operation


class _LiftingMethod:
    """A component's method, bound on the instance: the original, with the guards' fixes on the
    component lifted (a cast only when it is given a dtype: offloading moves devices every forward)."""

    def __init__(self, function: Callable, changes_weights: bool) -> None:
        functools.update_wrapper(self, function)  # name, docstring and signature of the original
        self.function = function
        self.changes_weights = changes_weights

    def __call__(self, component: nn.Module, *args: Any, **kwargs: Any) -> Any:
        name = self.function.__name__
        guards = _guards_of(component)
        if not guards or (name in CASTS and not casts_dtype(name, args, kwargs)):
            return self.function(component, *args, **kwargs)
        operation = f"{type(component).__name__}.{name}"
        with lifted(guards, operation, self.changes_weights, only=component):
            return self.function(component, *args, **kwargs)


def adopt_components(pipeline: Any, guard: Any) -> None:
    """Let ``guard`` lift its fixes around the adapter methods of ``pipeline``'s components.

    Idempotent and cheap: a component already adopted is skipped. Components shared with other
    pipelines lift every guard that adopted them.
    """
    for component in pipeline.components.values():
        if not isinstance(component, nn.Module):
            continue
        guards = _GUARDS.setdefault(component, {})
        held_ref = guards.get(id(guard))
        if held_ref is not None and held_ref() is guard:
            continue
        guards[id(guard)] = weakref.ref(guard)
        for name, changes_weights in COMPONENT_OPERATIONS.items():
            function = getattr(type(component), name, None)
            held = component.__dict__.get(name)
            if not callable(function) or (
                isinstance(held, types.MethodType) and isinstance(held.__func__, _LiftingMethod)
            ):
                continue
            component.__dict__[name] = types.MethodType(_LiftingMethod(function, changes_weights), component)


def release_components(pipeline: Any, guard: Any) -> None:
    """Undo ``adopt_components``: ``guard`` lifts no more; unheld components get their methods back."""
    for component in pipeline.components.values():
        if not isinstance(component, nn.Module):
            continue
        guards = _GUARDS.get(component, {})
        guards.pop(id(guard), None)
        if _guards_of(component):
            continue
        for name in COMPONENT_OPERATIONS:
            held = component.__dict__.get(name)
            if isinstance(held, types.MethodType) and isinstance(held.__func__, _LiftingMethod):
                del component.__dict__[name]


def pipeline_guards(pipeline: Any) -> list[Any]:
    """Every guard that adopted one of ``pipeline``'s components, and the pipeline's own guard."""
    guards = []
    if "guard" in pipeline.__dict__:  # made already (a copied pipeline's guard is adopted here)
        guards.append(pipeline.__dict__["guard"])
        adopt_components(pipeline, guards[0])
    for component in pipeline.components.values():
        if isinstance(component, nn.Module):
            guards += _guards_of(component)
    return list({id(guard): guard for guard in guards}.values())


def _guards_of(component: nn.Module) -> list[Any]:
    refs = _GUARDS.get(component, {})
    return [guard for ref in list(refs.values()) if (guard := ref()) is not None]


@contextlib.contextmanager
def lifted(
    guards: Iterable[Any], operation: str, changes_weights: bool, only: nn.Module | None = None
) -> Iterator[None]:
    """Run ``operation`` with every fix of ``guards`` lifted (``only`` those on that component);
    afterwards re-apply what still fits.

    The fixes are re-applied even when the operation raises. Inside a lift already in progress
    (a pipeline method calling a component's), only ``changes_weights`` is noted.
    """
    lifts = []
    try:
        for guard in guards:
            active = _ACTIVE.get(id(guard))
            if active is not None:
                active.changes_weights |= changes_weights
                continue
            lift = _Lift.take(guard, operation, changes_weights, only)
            _ACTIVE[id(guard)] = lift
            lifts.append(lift)
        yield
    finally:
        for lift in reversed(lifts):
            _ACTIVE.pop(id(lift.guard), None)
            lift.restore()


# -- lifting and re-applying -------------------------------------------------------------------


@dataclasses.dataclass
class _Held:
    """One lifted fix: its plan entry and the module objects it changed, by their names then."""

    entry: PlanEntry
    modules: dict[str, nn.Module | None]
    cost: FixInForce  # what it added and measured when it was made (error None: a plan's, unmeasured)
    degraded: bool = False

    @property
    def module(self) -> nn.Module | None:
        return self.modules[self.entry.module]


@dataclasses.dataclass
class Outcome:
    """What became of one lifted fix: re-applied on ``module`` (maybe renamed), or dropped and why."""

    strategy: str
    was: str
    module: str | None
    reason: str = ""


@dataclasses.dataclass
class _Lift:
    guard: Any
    operation: str
    changes_weights: bool
    held: list[_Held]
    dtypes: dict[str, torch.dtype | None]  # each lifted fix's component, once its fixes were reverted
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)

    @classmethod
    def take(cls, guard: Any, operation: str, changes_weights: bool, only: nn.Module | None = None) -> _Lift:
        """Record every held fix (plan entry, module objects, cost), or those on the component
        ``only``; then revert them."""
        held, lifted_fixes = [], []
        if guard.fixes:
            entries, costs = guard.plan().entries, guard.in_force()
            for fix, entry, cost in zip(list(guard.fixes), entries, costs, strict=True):
                if only is not None and _lookup(guard, fix.module_name.partition(".")[0]) is not only:
                    continue
                names = dict.fromkeys([fix.module_name, *getattr(fix, "changed_modules", ())])
                modules = {name: _lookup(guard, name) for name in names}
                degraded = cost.error is not None and not cost.error <= guard.options.tolerance
                held.append(_Held(entry, modules, cost, degraded))
                lifted_fixes.append(fix)
            guard.revert(lifted_fixes)
        components = {held_fix.entry.module.partition(".")[0] for held_fix in held}
        dtypes = {name: _component_dtype(guard, name) for name in components}
        return cls(guard, operation, changes_weights, held, dtypes)

    def restore(self) -> None:
        """Re-apply each lifted fix where it still fits, oldest first; log the ones dropped. Never raises."""
        for held in self.held:
            try:
                outcome = self._reapply(held)
            except Exception as error:  # a broken third-party strategy must not break the operation
                outcome = Outcome(
                    held.entry.strategy, held.entry.module, None, f"{type(error).__name__}: {error}"
                )
            self.outcomes.append(outcome)
            if outcome.module == outcome.was and not self.changes_weights:  # what it measured holds
                self.guard.restore_measured([held.cost])
            if outcome.module is None:
                logger.warning(
                    "guarded_diffusers: %s dropped the %s fix on %s: %s. If it still overflows, the next "
                    "call detects and fixes it again.",
                    self.operation,
                    outcome.strategy,
                    outcome.was,
                    outcome.reason,
                )
            elif outcome.module != outcome.was:
                logger.info(
                    "guarded_diffusers: %s moved the %s fix from %s to %s.",
                    self.operation,
                    outcome.strategy,
                    outcome.was,
                    outcome.module,
                )
        key = id(self.guard)
        _LAST_OUTCOMES[key] = (
            weakref.ref(self.guard, lambda _: _LAST_OUTCOMES.pop(key, None)),
            self.outcomes,
        )

    def _reapply(self, held: _Held) -> Outcome:
        entry = held.entry
        if held.degraded:
            reason = (
                f"it measured degraded (relative error {held.cost.error:.2g} against float32), and a fix "
                "carried across the operation unmeasured would no longer be reported"
            )
            return Outcome(entry.strategy, entry.module, None, reason)
        component = entry.module.partition(".")[0]
        was, now = self.dtypes.get(component), _component_dtype(self.guard, component)
        if now != was:
            reason = f"{component} now computes in {now}, and the fix was made and measured in {was}"
            return Outcome(entry.strategy, entry.module, None, reason)
        if entry.strategy in STRUCTURAL_STRATEGIES:
            candidates, reason = self._structural_targets(held)
        else:
            candidates, reason = self._unchanged_targets(held)
        failures = []
        for name in candidates:
            module = _lookup(self.guard, name)
            if module is None:
                continue
            moved = PlanEntry(entry.strategy, name, type(module).__name__, entry.params)
            try:
                self.guard.apply_plan(PrecisionPlan((moved,)))
            except (ValueError, KeyError, TypeError) as error:
                failures.append(str(error))
                continue
            return Outcome(entry.strategy, entry.module, name)
        return Outcome(entry.strategy, entry.module, None, reason or "; ".join(failures) or "nothing fits")

    def _structural_targets(self, held: _Held) -> tuple[list[str], str]:
        """Where a structural fix goes now: the same object, its LoRA wrapper, its new name."""
        name, old = held.entry.module, held.module
        current = _lookup(self.guard, name)
        if old is None:
            return [], f"{name} could not be found before {self.operation}"
        if current is old:
            return [name], ""
        if is_adapter_layer(current) and _base_layer(current) is old:
            return [name, f"{name}.base_layer"], ""  # the wrapper first: the adapter's output is inside
        if is_adapter_layer(old) and current is _base_layer(old):
            return [name], ""  # the LoRA layer was unloaded; its base layer is back under the name
        moved = _new_name(self.guard, name, old)
        if moved is not None:
            return [moved], ""
        if current is not None and type(current) is type(old):
            return [name], ""
        if current is None:
            return [], f"{name} no longer exists"
        return [], f"{name} is now {_describe(current)}, was {_describe(old)}"

    def _unchanged_targets(self, held: _Held) -> tuple[list[str], str]:
        """A fix that depends on weight values fits only the very modules and weights it was made on."""
        if self.changes_weights:
            return [], "the operation changed the weights its parameters were measured on"
        for name, old in held.modules.items():
            current = _lookup(self.guard, name)
            if current is None:
                return [], f"{name} no longer exists"
            if current is not old:
                return [], f"{name} is now {_describe(current)}, no longer the module the fix was made on"
            if _touches_adapter(self.guard, name, current):
                return [], f"{name} is, holds or sits inside a LoRA layer whose output the fix does not cover"
        return [held.entry.module], ""


def last_outcomes(guard: Any) -> list[Outcome]:
    """What the most recent adapter operation did with each of ``guard``'s fixes (empty if none)."""
    ref, outcomes = _LAST_OUTCOMES.get(id(guard), (None, []))
    return list(outcomes) if ref is not None and ref() is guard else []


def _describe(module: nn.Module) -> str:
    """``a LoRA layer (peft.tuners.lora.layer.Linear)``, ``a Linear``: peft's layers reuse torch's names."""
    cls = type(module)
    if is_adapter_layer(module):
        return f"a LoRA layer ({cls.__module__}.{cls.__qualname__})"
    return f"a {cls.__qualname__}"


def _component_dtype(guard: Any, component: str) -> torch.dtype | None:
    module = _lookup(guard, component)
    return module_dtype(module) if module is not None else None


def _lookup(guard: Any, name: str) -> nn.Module | None:
    try:
        return guard.module(name)
    except KeyError:
        return None


def _base_layer(layer: nn.Module) -> nn.Module | None:
    base = layer.__dict__.get("_modules", {}).get("base_layer")
    return base if isinstance(base, nn.Module) else None


def _new_name(guard: Any, name: str, module: nn.Module) -> str | None:
    """Where ``module`` sits now in its component, if anywhere."""
    component = name.partition(".")[0]
    root = _lookup(guard, component)
    if root is None:
        return None
    for path, candidate in root.named_modules():
        if candidate is module:
            return f"{component}.{path}" if path else component
    return None


def _touches_adapter(guard: Any, name: str, module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer, contains one, or sits inside one."""
    if any(is_adapter_layer(inner) for inner in module.modules()):
        return True
    parts = name.split(".")
    return any(is_adapter_layer(_lookup(guard, ".".join(parts[:end]))) for end in range(1, len(parts)))
