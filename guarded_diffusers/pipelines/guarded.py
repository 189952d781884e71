"""GuardedPipeline: what every guarded diffusers pipeline adds to its parent, whichever pipeline that is.

A guarded class is a thin subclass: it validates user arguments, installs the guard for the
duration of each call, checks latents after each step through diffusers' ``callback_on_step_end``
(where the pipeline offers it; otherwise the report names that stage unchecked), and attaches the
guard's report to the output. The denoising loop itself is diffusers' own. Subclassing
``GuardedPipeline`` together with a diffusers pipeline class is all a guarded class needs: the
call, ``encode_prompt`` and the LoRA methods keep the parent's signatures.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, SupportsIndex

import torch
from diffusers import DiffusionPipeline
from torch import nn
from torch.utils import _pytree as pytree
from typing_extensions import Self

from ..core.casting import cast_keeping_float32, module_dtype
from ..core.checks import validate_finite_inputs
from ..core.gate import exclusive
from ..core.guard import Guard
from ..core.options import Fidelity, GuardOptions
from ..core.plan import PrecisionPlan
from ..core.plugins import registered_strategies, resolve_strategies
from ..core.report import FixInForce
from ..core.stages import SCHEDULER_STAGE
from .baked_lora import mark_baked, scales_baked_lora
from .call_checks import check_dtype_arguments, validate_call_arguments
from .operations import adopt_components, casts_dtype, lifted, lifts_fixes_around_lora, pipeline_guards
from .outputs import with_report

# Set while diffusers' from_pipe runs: its closing ``.to(dtype)`` would cast the shared modules.
_SKIP_PIPELINE_CAST: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_cast", default=False)
GuardPlanArgument = PrecisionPlan | str | os.PathLike[str] | None
# diffusers' Stable Diffusion pipelines refuse sizes that are not multiples of 8.
_UNET_MULTIPLE = 8
# Each diffusers pipeline class -> its guarded subclass (the named classes register themselves).
_GUARDED_CLASSES: dict[type, type[GuardedPipeline]] = {}


class GuardedPipeline:
    """Mixin for a diffusers pipeline class: every call is checked, every overflow located and fixed.

    Load it like the parent (``from_pretrained``, ``from_pipe``), optionally choosing the recovery
    strategies in order (``guard_strategies=["rescale", "clamp"]``) and a precision plan to apply
    before the first step (``guard_plan=path``). Each call's output gains ``guard_report``. Fixes
    persist across calls; ``pipe.guard.reset()`` undoes them exactly. If nothing recovers a stage,
    the call raises ``NonFiniteError`` with the report.
    """

    # The diffusers class this one guards, and inputs its calls need (name -> what it is).
    guarded_base: ClassVar[type[DiffusionPipeline]]
    required_inputs: ClassVar[dict[str, str]] = {}
    _call_signature: ClassVar[inspect.Signature]
    _call_defaults: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = next(
            parent
            for parent in cls.__mro__[1:]
            if issubclass(parent, DiffusionPipeline) and not issubclass(parent, GuardedPipeline)
        )
        cls.guarded_base = base
        if cls.__module__ == __name__:  # made by guarded_class: a named class, if any, comes first
            _GUARDED_CLASSES.setdefault(base, cls)
        else:  # a named class, also when its module runs again (a reload): guard() hands out this one
            _GUARDED_CLASSES[base] = cls
        cls._call_signature = inspect.signature(base.__call__)
        cls._call_defaults = {
            name: p.default for name, p in cls._call_signature.parameters.items() if p.default is not p.empty
        }
        if "__call__" not in cls.__dict__:
            cls.__call__ = _guarded_call_method(base, cls._call_signature)  # type: ignore[method-assign]
        if callable(getattr(base, "encode_prompt", None)) and "encode_prompt" not in cls.__dict__:
            cls.encode_prompt = _encode_prompt_method(base.encode_prompt)  # type: ignore[attr-defined]
        lifts_fixes_around_lora(cls)  # load_lora_weights, fuse_lora, ...: fixes lifted around each
        scales_baked_lora(cls)  # from a baked folder, load_lora_weights scales the LoRA

    @functools.cached_property
    def guard(self) -> Guard:
        """The guard watching this pipeline: its strategies, fixes, last report, ``plan()``, ``reset()``."""
        guard = Guard(self, strategies=resolve_strategies(None), options=GuardOptions())
        adopt_components(self, guard)
        return guard

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        guard_strategies: Sequence[str] | None = None,
        guard_plan: GuardPlanArgument = None,
        guard_fidelity: Fidelity = "best",
        guard_tolerance: float = GuardOptions.tolerance,
        guard_max_extra_memory: float | int = GuardOptions.max_extra_memory,
        **kwargs,
    ) -> Self:
        """The parent's from_pretrained, plus the guard's settings.

        ``guard_strategies``: recovery strategies in order; ``guard_plan``: a precision plan applied
        right after loading; ``guard_tolerance``: the relative error against float32 a fix may have
        and still count as recovered (default 2**-8, bfloat16's rounding unit); ``guard_fidelity``:
        ``"best"`` keeps the most faithful finite fix when none is within tolerance (reported as
        degraded), ``"strict"`` raises ``NonFiniteError`` instead; ``guard_max_extra_memory``: what
        all fixes together may add, as a fraction of the parameter bytes (float) or bytes (int).
        All are checked before any weight is loaded; a plan that does not fit the model is a
        ``ValueError`` with the pipeline left unfixed. A ``dtype`` given as text (``"fp16"``) is a
        ``ValueError``: diffusers would silently load float32.
        """
        check_dtype_arguments(kwargs, allow_dict=True)
        settings = guard_settings(
            guard_strategies, guard_plan, guard_fidelity, guard_tolerance, guard_max_extra_memory
        )
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)  # type: ignore[misc]
        mark_baked(pipeline, pretrained_model_name_or_path, kwargs)
        return pipeline._install_guard(*settings)

    @classmethod
    def from_pipe(
        cls,
        pipeline,
        *,
        guard_strategies: Sequence[str] | None = None,
        guard_plan: GuardPlanArgument = None,
        guard_fidelity: Fidelity = "best",
        guard_tolerance: float = GuardOptions.tolerance,
        guard_max_extra_memory: float | int = GuardOptions.max_extra_memory,
        **kwargs,
    ):
        """Share an existing pipeline's components; without ``dtype`` no module's dtype changes.

        diffusers' ``from_pipe`` casts every shared module (to float32 when no dtype is given), so the
        source pipeline changes too, and ``.to(float16)`` casts the modules a model keeps in float32
        (T5's ``wo``, kept there against float16 overflow). Here nothing is cast without ``dtype``; with
        it, each model is cast as transformers loads it, its ``_keep_in_fp32_modules`` staying float32.
        The ``guard_*`` settings work as in ``from_pretrained``.
        """
        check_dtype_arguments(kwargs, allow_dict=False)
        settings = guard_settings(
            guard_strategies, guard_plan, guard_fidelity, guard_tolerance, guard_max_extra_memory
        )
        dtype = kwargs.get("dtype") if kwargs.get("dtype") is not None else kwargs.get("torch_dtype")
        token = _SKIP_PIPELINE_CAST.set(True)
        try:
            new_pipeline = super().from_pipe(pipeline, **kwargs)  # type: ignore[misc]
        finally:
            _SKIP_PIPELINE_CAST.reset(token)
        if dtype is not None:
            with lifted(pipeline_guards(new_pipeline), f"{cls.__name__}.from_pipe", changes_weights=False):
                for component in new_pipeline.components.values():
                    if isinstance(component, nn.Module):
                        cast_keeping_float32(component, dtype)
        return new_pipeline._install_guard(*settings)

    def to(self, *args, **kwargs) -> Self:
        """DiffusionPipeline.to, with held fixes lifted around a dtype change (``operations``); inside
        ``from_pipe`` only, a no-op, so shared modules keep their dtype."""
        if _SKIP_PIPELINE_CAST.get():
            return self
        if not casts_dtype("to", args, kwargs):
            return super().to(*args, **kwargs)  # type: ignore[misc]
        with lifted(pipeline_guards(self), f"{type(self).__name__}.to", changes_weights=False):
            return super().to(*args, **kwargs)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        """A copy with its own modules and its own guard, holding the same fixes (re-applied on the
        copy's modules, with the costs and errors they measured): fixes are lifted while the modules
        are copied, so no hook or saved tensor of the original's fixes travels."""
        with _plain_state(self, "copy.deepcopy") as (state, settings):
            clone = object.__new__(type(self))
            memo[id(self)] = clone
            clone.__dict__.update(copy.deepcopy(state, memo))
        return clone._restore_guard(settings)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Pickle the pipeline as plain diffusers state plus its guard's settings and fixes.

        With fixes held, the state is a copy made with them lifted (twice the parameter memory while
        pickling); the unpickled pipeline re-applies them. Strategies travel by name: a strategy
        registered at run time must be registered in the process that unpickles.
        """
        with _plain_state(self, "pickle") as (state, settings):
            if settings is not None and settings.plan.entries:
                state = copy.deepcopy(state)
        return (_unpickled, (self.guarded_base, state, settings))

    def _restore_guard(self, settings: _GuardSettings | None) -> Self:
        """Give a copied pipeline its own guard and the fixes the original held."""
        if settings is None:
            return self
        self._install_guard(resolve_strategies(settings.strategies), settings.plan, settings.options)
        self.guard.restore_measured(settings.measured)
        return self

    def _install_guard(
        self, strategies: list[Any], plan: PrecisionPlan | None, options: GuardOptions
    ) -> Self:
        guard = Guard(self, strategies, options)
        if plan is not None:
            guard.apply_plan(plan)
        self.__dict__["guard"] = guard  # what the cached property would hold
        adopt_components(self, guard)
        return self

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ):
        """The parent's save_pretrained, writing the weights as loaded: fixes are lifted for the save.

        Fixes change weights in place (a float32 island, a shifted channel), so saving them would
        publish a different model; they are reverted for the save and re-applied from their plan.
        """
        save = functools.partial(
            super().save_pretrained,  # type: ignore[misc]
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            use_flashpack=use_flashpack,
            **kwargs,
        )
        with self.guard.lifted():
            return save()

    def to_json_string(self) -> str:
        """The pipeline config, naming the diffusers class so saved folders load with plain diffusers."""
        config = json.loads(super().to_json_string())  # type: ignore[misc]
        config["_class_name"] = self.guarded_base.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _guarded_call(self, *args: Any, **kwargs: Any) -> Any:
        signature = self._call_signature
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        validate_finite_inputs(arguments)
        validate_call_arguments(
            arguments,
            self._call_defaults,
            pixel_multiple(self),
            self.guarded_base.__name__,
            self.required_inputs,
        )
        unchecked = []
        if "callback_on_step_end" in signature.parameters:
            user_callback = arguments.get("callback_on_step_end")
            user_inputs = list(arguments.get("callback_on_step_end_tensor_inputs", ["latents"]))
            bound.arguments["callback_on_step_end"] = self._step_callback(user_callback, user_inputs)
            bound.arguments["callback_on_step_end_tensor_inputs"] = list(
                dict.fromkeys(["latents", *user_inputs])
            )
        else:
            unchecked.append(SCHEDULER_STAGE)
        adopt_components(self, self.guard)  # a component set since the guard was made
        with self.guard.watching(unchecked) as report:
            output = super().__call__(*bound.args[1:], **bound.kwargs)  # type: ignore[misc]
        return output if isinstance(output, tuple) else with_report(output, report)

    def _step_callback(self, user_callback: Any, user_inputs: list[str]) -> Callable[..., dict[str, Any]]:
        """Check the scheduler's latents, then hand the user's callback exactly what it asked for."""

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self.guard.check_latents(tensors["latents"], step)
            if user_callback is None:
                return {}
            return user_callback(pipeline, step, timestep, {name: tensors[name] for name in user_inputs})

        return on_step_end


@dataclasses.dataclass
class _GuardSettings:
    """What a copy of a guarded pipeline needs to guard itself as the original was guarded."""

    strategies: list[str]  # by name: the registry resolves them in this process or the unpickling one
    options: GuardOptions
    plan: PrecisionPlan
    measured: list[FixInForce]


@contextlib.contextmanager
def _plain_state(
    pipeline: GuardedPipeline, operation: str
) -> Iterator[tuple[dict[str, Any], _GuardSettings | None]]:
    """The pipeline's attributes without its guard, while every fix on its modules is lifted and no
    forward runs through a guarded component; and the guard's settings and fixes (None: no guard)."""
    guard = pipeline.__dict__.get("guard")
    settings = None
    if guard is not None:
        names = [strategy.name for strategy in guard.strategies]
        settings = _GuardSettings(names, guard.options, guard.plan(), guard.in_force())
    with exclusive(), lifted(pipeline_guards(pipeline), operation, changes_weights=False):
        yield {name: value for name, value in pipeline.__dict__.items() if name != "guard"}, settings


def _unpickled(
    base: type[DiffusionPipeline], state: dict[str, Any], settings: _GuardSettings | None
) -> GuardedPipeline:
    """A pickled guarded pipeline back: its guarded class (by its diffusers class), state and guard."""
    pipeline = object.__new__(guarded_class(base))
    pipeline.__dict__.update(state)
    return pipeline._restore_guard(settings)


def pixel_multiple(pipe: DiffusionPipeline) -> int:
    """What a height or width must be a multiple of: Flux packs 2 x 2 latents (2 x vae_scale_factor),
    SD3 patches them (x its transformer's patch_size), UNets take multiples of 8 (diffusers' check)."""
    scale = int(getattr(pipe, "vae_scale_factor", 1))
    if hasattr(pipe, "_pack_latents"):
        return 2 * scale
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    return scale * patch if patch else math.lcm(_UNET_MULTIPLE, scale)


def guarded_class(base: type[DiffusionPipeline]) -> type[GuardedPipeline]:
    """The guarded subclass of a diffusers pipeline class: a named one, or ``Guarded<Name>`` made once."""
    if issubclass(base, GuardedPipeline):
        return base
    held = _GUARDED_CLASSES.get(base)
    if held is None:
        held = type(f"Guarded{base.__name__}", (GuardedPipeline, base), {"__module__": __name__})
    return held


def guard_settings(
    guard_strategies: Sequence[str] | None,
    guard_plan: GuardPlanArgument,
    guard_fidelity: Fidelity,
    guard_tolerance: float,
    guard_max_extra_memory: float | int,
) -> tuple[list[Any], PrecisionPlan | None, GuardOptions]:
    """Resolve strategy names, read the plan, check the settings: all errors come before any weight loads."""
    options = GuardOptions(guard_fidelity, guard_tolerance, guard_max_extra_memory)
    strategies = resolve_strategies(guard_strategies)
    if guard_plan is None or isinstance(guard_plan, PrecisionPlan):
        plan = guard_plan
    elif isinstance(guard_plan, str | os.PathLike):
        plan = PrecisionPlan.load(guard_plan)
    else:
        raise TypeError(f"`guard_plan` must be a path or a PrecisionPlan, not {type(guard_plan).__name__}.")
    if plan is not None:
        plan.check_strategies(registered_strategies())
    return strategies, plan, options


def _guarded_call_method(base: type, signature: inspect.Signature) -> Callable[..., Any]:
    def __call__(self: GuardedPipeline, *args: Any, **kwargs: Any) -> Any:
        return self._guarded_call(*args, **kwargs)

    functools.update_wrapper(__call__, base.__call__)  # getsource, get_type_hints see the parent's
    __call__.__signature__ = signature  # type: ignore[attr-defined]
    return __call__


def _encode_prompt_method(inherited: Callable[..., Any]) -> Callable[..., Any]:
    """The parent's encode_prompt, returning each tensor in the dtype it had before a fix upcast an encoder.

    A float32 island over a whole text encoder changes its ``dtype``, which diffusers' pipelines use
    for the prompt embeddings: the denoiser would then get float32 inputs it cannot take.
    """

    @functools.wraps(inherited)
    def encode_prompt(self: GuardedPipeline, *args: Any, **kwargs: Any) -> Any:
        output = inherited(self, *args, **kwargs)
        guard = self.guard
        if not guard.fixes:
            return output
        widened = {}
        for stage in guard.stages:
            module = getattr(self, stage.component, None)
            working = guard.working_dtype(stage.component)
            if stage.component.startswith("text_encoder") and isinstance(module, nn.Module):
                current = module_dtype(module)
                if current is not None and working is not None and current != working:
                    widened[current] = working
        return pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(widened[t.dtype]) if t.dtype in widened else t, output
        )

    return encode_prompt
