"""GuardedFluxFillPipeline: FluxFillPipeline that never returns a silent black image.

A thin subclass: it validates user arguments, installs the guard for the duration of each
call, checks latents after each step through diffusers' ``callback_on_step_end``, and
attaches the guard's report to the output. The denoising loop itself is diffusers' own.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxFillPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from typing_extensions import Self

from ..core.casting import set_tensor_dtype
from ..core.checks import validate_finite_inputs
from ..core.guard import Guard
from ..core.options import Fidelity, GuardOptions
from ..core.plan import PrecisionPlan
from ..core.plugins import registered_strategies, resolve_strategies
from ..core.report import GuardReport
from .call_checks import check_dtype_arguments, validate_call_arguments
from .lora_lifecycle import adopt_components, lifts_fixes_around_lora

# User-supplied tensors that must be finite before any model runs.
_CHECKED_INPUTS = (
    "image",
    "mask_image",
    "latents",
    "masked_image_latents",
    "prompt_embeds",
    "pooled_prompt_embeds",
)
_CALL_SIGNATURE = inspect.signature(FluxFillPipeline.__call__)
_CALL_DEFAULTS = {
    name: p.default for name, p in _CALL_SIGNATURE.parameters.items() if p.default is not p.empty
}
# Set while diffusers' from_pipe runs: its closing ``.to(dtype)`` would cast the shared modules.
_SKIP_PIPELINE_CAST: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_cast", default=False)
GuardPlanArgument = PrecisionPlan | str | os.PathLike[str] | None


@dataclasses.dataclass
class GuardedFluxPipelineOutput(FluxPipelineOutput):
    """``FluxPipelineOutput`` plus ``guard_report``: the incidents of this call."""

    guard_report: GuardReport | None = None


@lifts_fixes_around_lora  # load_lora_weights, fuse_lora, ...: fixes lifted around each
class GuardedFluxFillPipeline(FluxFillPipeline):
    """Drop-in FluxFillPipeline that checks every stage for NaN/inf and recovers in place.

    Load it like the original (``from_pretrained``, ``from_pipe``), optionally choosing the
    recovery strategies in order (``guard_strategies=["rescale", "clamp"]``) and a precision plan
    to apply before the first step (``guard_plan=path``). Each call's output gains
    ``guard_report``. Fixes persist across calls; ``pipe.guard.reset()`` undoes them exactly.
    If nothing recovers a stage, the call raises ``NonFiniteError`` with the report.
    """

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
        """FluxFillPipeline.from_pretrained, plus the guard's settings.

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
        settings = _guard_arguments(
            guard_strategies, guard_plan, guard_fidelity, guard_tolerance, guard_max_extra_memory
        )
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
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
        settings = _guard_arguments(
            guard_strategies, guard_plan, guard_fidelity, guard_tolerance, guard_max_extra_memory
        )
        dtype = kwargs.get("dtype") if kwargs.get("dtype") is not None else kwargs.get("torch_dtype")
        token = _SKIP_PIPELINE_CAST.set(True)
        try:
            new_pipeline = super().from_pipe(pipeline, **kwargs)
        finally:
            _SKIP_PIPELINE_CAST.reset(token)
        if dtype is not None:
            for component in new_pipeline.components.values():
                if isinstance(component, torch.nn.Module):
                    _cast_keeping_float32(component, dtype)
        return new_pipeline._install_guard(*settings)

    def to(self, *args, **kwargs) -> Self:
        """DiffusionPipeline.to; inside ``from_pipe`` only, a no-op, so shared modules keep their dtype."""
        if _SKIP_PIPELINE_CAST.get():
            return self
        return super().to(*args, **kwargs)

    def _install_guard(
        self, strategies: list[Any], plan: PrecisionPlan | None, options: GuardOptions
    ) -> GuardedFluxFillPipeline:
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
        """FluxFillPipeline.save_pretrained, writing the weights as loaded: fixes are lifted for the save.

        Fixes change weights in place (a float32 island, a shifted channel), so saving them would
        publish a different model; they are reverted for the save and re-applied from their plan.
        """
        save = functools.partial(
            super().save_pretrained,
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
        """The pipeline config, naming FluxFillPipeline so saved folders load with plain diffusers."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = FluxFillPipeline.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def encode_prompt(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        max_sequence_length: int = 512,
        lora_scale: float | None = None,
    ):
        """FluxFillPipeline.encode_prompt, in the text encoders' dtype from before any fix upcast them."""
        prompt_embeds, pooled_prompt_embeds, text_ids = super().encode_prompt(
            prompt,
            prompt_2,
            device,
            num_images_per_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            max_sequence_length,
            lora_scale,
        )
        if not self.guard.fixes:
            return prompt_embeds, pooled_prompt_embeds, text_ids
        t5_dtype = self.guard.working_dtype("text_encoder_2") or prompt_embeds.dtype
        clip_dtype = self.guard.working_dtype("text_encoder") or pooled_prompt_embeds.dtype
        return prompt_embeds.to(t5_dtype), pooled_prompt_embeds.to(clip_dtype), text_ids.to(clip_dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> GuardedFluxPipelineOutput | tuple:
        bound = _CALL_SIGNATURE.bind(self, *args, **kwargs)
        arguments = bound.arguments
        validate_finite_inputs({name: arguments[name] for name in _CHECKED_INPUTS if name in arguments})
        validate_call_arguments({**_CALL_DEFAULTS, **arguments}, self.vae_scale_factor * 2)
        user_callback = arguments.get("callback_on_step_end")
        user_inputs = list(arguments.get("callback_on_step_end_tensor_inputs", ["latents"]))
        arguments["callback_on_step_end"] = self._step_callback(user_callback, user_inputs)
        arguments["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys(["latents", *user_inputs]))
        adopt_components(self, self.guard)  # a component set since the guard was made
        with self.guard.watching() as report:
            output = super().__call__(*bound.args[1:], **bound.kwargs)
        if isinstance(output, tuple):
            return output
        return GuardedFluxPipelineOutput(images=output.images, guard_report=report)

    __call__.__signature__ = _CALL_SIGNATURE  # type: ignore[attr-defined]

    def _step_callback(self, user_callback: Any, user_inputs: list[str]) -> Any:
        """Check the scheduler's latents, then hand the user's callback exactly what it asked for."""

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self.guard.check_latents(tensors["latents"], step)
            if user_callback is None:
                return {}
            return user_callback(pipeline, step, timestep, {name: tensors[name] for name in user_inputs})

        return on_step_end


def _cast_keeping_float32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)``, except the tensors transformers keeps in float32 when it loads at ``dtype``."""
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if not keep:
        module.to(dtype=dtype)
        return
    kept = re.compile("|".join(pattern.replace("*", ".*") for pattern in keep))
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            set_tensor_dtype(module, name, torch.float32 if kept.search(name) else dtype)


def _guard_arguments(
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
