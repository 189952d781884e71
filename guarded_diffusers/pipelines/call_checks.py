"""Argument checks for guarded pipelines: a bad value is a ValueError naming it, before any model runs.

diffusers lets many bad values through to an IndexError, a shape mismatch deep in the VAE, a NaN
image or a silent float32 load; these checks match what the ``fluxguard`` command refuses.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

# diffusers refuses longer T5 sequences itself, but only after validating everything else.
MAX_SEQUENCE_LENGTH = 512
# PIL modes whose pixels are raw numbers rather than 0..255 levels; diffusers converts them to "L".
_NUMERIC_MASK_MODES = ("I", "F")
_DTYPE_NAMES = {
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def check_dtype_arguments(kwargs: Mapping[str, Any], allow_dict: bool) -> None:
    """Refuse a dtype given as text: diffusers silently loads float32 for ``dtype="fp16"``."""
    for name in ("dtype", "torch_dtype"):
        value = kwargs.get(name)
        items = value.items() if allow_dict and isinstance(value, dict) else [(None, value)]
        for key, item in items:
            if item is None or isinstance(item, torch.dtype):
                continue
            label = name if key is None else f"{name}[{key!r}]"
            known = _DTYPE_NAMES.get(str(item).lower().removeprefix("torch."))
            suggestion = f"torch.{known}" if known else "a torch.dtype such as torch.float16"
            raise ValueError(
                f"`{label}` must be a torch.dtype, not {item!r} (diffusers would silently fall back to "
                f"float32); pass {suggestion}."
            )


def validate_call_arguments(
    arguments: Mapping[str, Any],
    defaults: Mapping[str, Any],
    pixel_multiple: int,
    pipeline: str,
    required: Mapping[str, str],
) -> None:
    """Check a call's ``arguments`` against what ``pipeline``'s signature takes and its ``defaults``.

    ``pixel_multiple`` is the model's pixel block; ``required`` names inputs the call cannot do
    without, and what each is. Checks of an argument the pipeline does not take are skipped, and so
    are those of a None the pipeline itself defaults to (QwenImage's ``guidance_scale=None``: the
    pipeline decides what None means).
    """
    arguments = {**defaults, **arguments}
    for name, what in required.items():
        if arguments.get(name) is None:
            raise ValueError(f"`{name}` is required: {what}.")
    _check_prompts(arguments)
    unset = {name for name, value in arguments.items() if value is None and defaults.get(name, ...) is None}
    _check_numbers({name: arguments[name] for name in arguments.keys() - unset}, pixel_multiple)
    _check_pil_modes(arguments, pipeline)
    _check_batch(arguments)


def _check_prompts(arguments: Mapping[str, Any]) -> None:
    for name in ("prompt", "prompt_2", "prompt_3"):
        value = arguments.get(name)
        if isinstance(value, list | tuple) and not value:
            raise ValueError(f"`{name}` is an empty list; pass at least one prompt.")
        if isinstance(value, list | tuple) and not all(isinstance(item, str) for item in value):
            kinds = sorted({type(item).__name__ for item in value if not isinstance(item, str)})
            raise ValueError(f"`{name}` must be a string or a list of strings; it holds {', '.join(kinds)}.")
    prompt = arguments.get("prompt")
    for name in ("prompt_2", "prompt_3"):
        other = arguments.get(name)
        if prompt is not None and isinstance(other, list | tuple) and len(other) != _count(prompt):
            raise ValueError(
                f"`{name}` has {len(other)} entries but `prompt` has {_count(prompt)}; give one `{name}` "
                "per prompt, or leave it None to reuse `prompt`."
            )


def _count(prompt: str | list[str] | tuple[str, ...]) -> int:
    return 1 if isinstance(prompt, str) else len(prompt)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_numbers(arguments: Mapping[str, Any], pixel_multiple: int) -> None:
    guidance = arguments.get("guidance_scale", 0.0)
    if not (_is_number(guidance) and math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"`guidance_scale` must be a finite number >= 0, not {guidance!r}.")
    for name in ("height", "width"):
        value = arguments.get(name)
        if value is not None and not (_is_whole(value) and value >= pixel_multiple):
            raise ValueError(
                f"`{name}` must be a whole number of pixels >= {pixel_multiple} (this model works in "
                f"{pixel_multiple}-pixel blocks), not {value!r}; leave it None for the default."
            )
    steps = arguments.get("num_inference_steps", 1)
    scheduled = arguments.get("sigmas") is not None or arguments.get("timesteps") is not None
    if not scheduled and not (_is_whole(steps) and steps >= 1):
        raise ValueError(f"`num_inference_steps` must be a whole number >= 1, not {steps!r}.")
    copies = arguments.get("num_images_per_prompt", 1)
    if not (_is_whole(copies) and copies >= 1):
        raise ValueError(f"`num_images_per_prompt` must be a whole number >= 1, not {copies!r}.")
    strength = arguments.get("strength", 1.0)
    if not (_is_number(strength) and 0 < strength <= 1):
        raise ValueError(
            f"`strength` must be a number in (0, 1], not {strength!r}; 1 repaints the masked area from noise."
        )
    length = arguments.get("max_sequence_length", 1)
    if not (_is_whole(length) and 1 <= length <= MAX_SEQUENCE_LENGTH):
        raise ValueError(
            f"`max_sequence_length` must be a whole number of T5 tokens in [1, {MAX_SEQUENCE_LENGTH}], "
            f"not {length!r}."
        )


def _pil_images(value: Any) -> list[Image.Image]:
    items = value if isinstance(value, list | tuple) else [value]
    return [item for item in items if isinstance(item, Image.Image)]


def _check_pil_modes(arguments: Mapping[str, Any], pipeline: str) -> None:
    """diffusers feeds PIL images to the VAE unconverted (RGB only) and masks through ``convert("L")``."""
    for image in _pil_images(arguments.get("image")):
        if image.mode != "RGB":
            raise ValueError(
                f"`image` is a mode-{image.mode!r} PIL image, but {pipeline} reads PIL images "
                "unconverted and only RGB gives a picture; pass image.convert('RGB')."
            )
    for mask in _pil_images(arguments.get("mask_image")):
        _check_pil_mask(mask)


def _check_pil_mask(mask: Image.Image) -> None:
    try:
        Image.new(mask.mode, (1, 1)).convert("L")
    except (ValueError, OSError):
        raise ValueError(
            f"`mask_image` is a mode-{mask.mode!r} PIL image, which Pillow cannot turn into a greyscale "
            "mask; pass a mode-'L' image (white = repaint)."
        ) from None
    if not mask.mode.startswith(_NUMERIC_MASK_MODES):
        return
    values = np.asarray(mask, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise ValueError(
            f"`mask_image` is a mode-{mask.mode!r} image with values from {low:g} to {high:g}, but masks are "
            "read as 0..255 levels and the rest is clipped; scale it into 0..255 (white = repaint)."
        )
    if 0 < high <= 1:
        raise ValueError(
            f"`mask_image` is a mode-{mask.mode!r} image with values in 0..1, but PIL masks are read as "
            "0..255 levels, so nothing would be repainted; multiply it by 255 or pass a numpy array in 0..1."
        )


def _batch(value: Any, is_mask: bool) -> int | None:
    """How many pictures diffusers' image processor makes of ``value`` (None when it cannot tell)."""
    if isinstance(value, Image.Image):
        return 1
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.shape[0] if value.ndim == 4 or (is_mask and value.ndim == 3) else 1
    if isinstance(value, list | tuple) and value:
        first = value[0]
        if isinstance(first, torch.Tensor | np.ndarray) and first.ndim == 4:
            return sum(item.shape[0] for item in value)
        return len(value)
    return None


def _check_batch(arguments: Mapping[str, Any]) -> None:
    """Each image and mask batch must divide the outputs the prompts ask for, as diffusers repeats it."""
    prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
    if isinstance(prompt, str | list | tuple):
        prompts = _count(prompt)
    elif isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
        prompts = embeds.shape[0]
    else:
        return
    total = prompts * arguments.get("num_images_per_prompt", 1)
    checked = {"image": _batch(arguments.get("image"), is_mask=False)}
    if arguments.get("masked_image_latents") is None:
        checked["mask_image"] = _batch(arguments.get("mask_image"), is_mask=True)
    for name, size in checked.items():
        if size is not None and (size > total or total % size):
            raise ValueError(
                f"`{name}` holds {size} picture(s) but the call makes {total} image(s) ({prompts} from "
                f"`prompt` x `num_images_per_prompt`={total // prompts}), and diffusers only repeats a batch "
                f"that divides that number; pass one `prompt` per picture in `{name}`."
            )
    sizes = [size for size in checked.values() if size is not None]
    if len(sizes) == 2 and 1 not in sizes and sizes[0] != sizes[1]:
        raise ValueError(
            f"`image` holds {sizes[0]} picture(s) but `mask_image` holds {sizes[1]}; pass one mask per "
            "image or a single mask for all."
        )
