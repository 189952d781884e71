"""The fluxguard command's input checks: every bad path or file is one clear line, before any model runs."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pytest_fluxguard.model_folder import NotAFluxFillModel, weight_variants

from ..core.plan import PrecisionPlan

# FluxFillPipeline's longest T5 prompt (guarded_diffusers.pipelines.call_checks.MAX_SEQUENCE_LENGTH, which
# imports torch: the command's --help must not wait for it).
MAX_SEQUENCE_LENGTH = 512
# The library's argument names, as the command's options that feed them: an error raised by the
# library speaks of `guard_strategies`, the command's user typed --strategies.
OPTION_FOR_ARGUMENT = {
    "guard_strategies": "--strategies",
    "guard_plan": "--plan",
    "guard_max_extra_memory": "--max-extra-memory",
    "guard_report": "the incident table",
    "guidance_scale": "--guidance",
    "num_inference_steps": "--steps",
    "max_sequence_length": "--max-sequence-length",
    "mask_image": "--mask",
    "image": "--image",
    "prompt": "--prompt",
    "dtype": "--dtype",
    "torch_dtype": "--dtype",
    "generator": "--seed",
    "height": "the image's height",
    "width": "the image's width",
}
# Bare (unquoted) names are translated too when they cannot be an ordinary word.
_ARGUMENT = re.compile(
    r"`(\w+)`|\b(" + "|".join(name for name in OPTION_FOR_ARGUMENT if "_" in name) + r")\b"
)
# The weights file each library reads from a model component's folder, before any variant suffix.
_WEIGHTS_STEM = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_LEGACY_WEIGHTS_STEM = {"diffusers": "diffusion_pytorch_model", "transformers": "pytorch_model"}


class UsageError(Exception):
    """Bad input: the command prints the message on one line and exits with status 2."""


def in_command_terms(message: str) -> str:
    """``message`` from the library with its argument names replaced by the command's options."""

    def option(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        return OPTION_FOR_ARGUMENT.get(name, match[0])

    return _ARGUMENT.sub(option, message)


def model_folder(path: Path) -> Path:
    """``path`` if it holds a Flux Fill pipeline saved with ``save_pretrained``."""
    if not path.exists():
        raise UsageError(f"model folder {path} does not exist")
    try:
        weight_variants(path)
    except NotAFluxFillModel as error:
        raise UsageError(f"{path} is not a Flux Fill model: {str(error).rstrip('.')}") from None
    missing = missing_weights(path)
    if missing:
        raise UsageError(f"model folder {path} is incomplete: {missing}")
    return path


def pipeline_folder(path: Path) -> str:
    """The pipeline class ``path`` was saved as (``save_pretrained``), once every weights file is there."""
    if not path.exists():
        raise UsageError(f"model folder {path} does not exist")
    index = _read_json(path / "model_index.json")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):
        raise UsageError(
            f"{path} is not a diffusers pipeline folder: no readable model_index.json naming its class"
        )
    missing = missing_weights(path)
    if missing:
        raise UsageError(f"model folder {path} is incomplete: {missing}")
    return name


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _component_weights(directory: Path, library: str) -> str | None:
    """What is missing for ``directory`` to hold its model's default weights, or None if nothing is.

    diffusers and transformers read ``<stem>.safetensors``, else its sharded index
    ``<stem>.safetensors.index.json`` and every shard it lists, else the legacy ``.bin`` files.
    """
    stem = _WEIGHTS_STEM[library]
    legacy = _LEGACY_WEIGHTS_STEM[library]
    for weights in (f"{stem}.safetensors", f"{legacy}.bin"):
        if (directory / weights).is_file():
            return None
        index_file = directory / f"{weights}.index.json"
        if index_file.is_file():
            index = _read_json(index_file)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                return None  # malformed: the library's own error says more than we could
            shards = sorted({str(shard) for shard in weight_map.values()})
            absent = [shard for shard in shards if not (directory / shard).is_file()]
            if absent:
                more = f" (and {len(absent) - 1} more shards)" if len(absent) > 1 else ""
                return f"{directory / absent[0]} is missing{more}; {index_file.name} lists it"
            return None
    variants = sorted(
        file.name for file in directory.glob(f"{stem}.*.safetensors") if file.name.count(".") == 2
    )
    found = f" (only variant weights: {', '.join(variants)})" if variants else ""
    return f"{directory / f'{stem}.safetensors'} is missing{found}"


def missing_weights(folder: Path) -> str | None:
    """The first weights file a model component of ``folder`` lacks, named; None when all are there.

    Checked from the file names, before loading: diffusers would name the last file it tried
    (``diffusion_pytorch_model.bin``), not the ``.safetensors`` file that is missing.
    """
    index = _read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        return None
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library = entry[0]
        if library not in _WEIGHTS_STEM:
            continue  # an absent optional component ([null, null]) or another library
        directory = folder / component
        if not directory.is_dir():
            return f"{directory} is missing (model_index.json lists {component})"
        if not (directory / "config.json").is_file():
            continue  # a scheduler or a tokenizer: no weights
        missing = _component_weights(directory, library)
        if missing:
            return missing
    return None


def read_image(path: Path, option: str, mode: str) -> Image.Image:
    """The picture at ``path`` converted to ``mode``; the error names ``option`` and the file."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise UsageError(f"{option} {path} does not exist") from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UsageError(f"{option} {path} cannot be read as an image ({error})") from None


def image_and_mask(image_path: Path, mask_path: Path) -> tuple[Image.Image, Image.Image]:
    """RGB image and single-channel mask of the same size."""
    image = read_image(image_path, "--image", "RGB")
    mask = read_image(mask_path, "--mask", "L")
    if mask.size != image.size:
        raise UsageError(
            f"--mask {mask_path} is {mask.width}x{mask.height} but --image {image_path} is "
            f"{image.width}x{image.height}; they must be the same size"
        )
    return image, mask


def image_output(path: Path) -> Path:
    """``path`` if Pillow can write its format and it is not a folder."""
    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"-o {path}: unknown image format {path.suffix or '(no extension)'}; use .png")
    if path.is_dir():
        raise UsageError(f"-o {path} is a folder; give a file name such as {path / 'fill.png'}")
    return path


def output_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder")
    return path


def device(name: str) -> str:
    """``name`` if this machine has it; ``auto`` always passes."""
    import torch  # here, not at the top: ``fluxguard --help`` must not wait for torch

    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if name in available and not available[name]():
        raise UsageError(f"--device {name}: this machine has no {name} device (use cpu or auto)")
    return name


def precision_plan(path: Path) -> PrecisionPlan:
    try:
        return PrecisionPlan.load(path)
    except ValueError as error:
        raise UsageError(f"--plan: {str(error).rstrip('.')}") from None


def strategy_names(text: str | None) -> list[str] | None:
    """Names from ``--strategies`` (``none`` turns recovery off), checked against the registered plugins."""
    if text is None:
        return None
    from ..core.plugins import registered_strategies  # loads the strategies, hence torch

    if text.strip() == "none":
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--strategies {text!r}: name at least one strategy, or none to only detect")
    try:
        known = registered_strategies()
    except ValueError as error:  # two plugins register one name
        raise UsageError(f"--strategies: {in_command_terms(str(error)).rstrip('.')}") from None
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(
            f"--strategies {text}: unknown strateg{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))} (or none to only detect)"
        )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--strategies {text}: {', '.join(twice)} named more than once")
    return names


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def sequence_length(text: str) -> int:
    """argparse type: a T5 prompt length FluxFillPipeline accepts, 1 to 512 tokens."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SEQUENCE_LENGTH:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of T5 tokens from 1 to {MAX_SEQUENCE_LENGTH}, got {text!r}"
        )
    return value


def memory_fraction(value: float) -> float:
    """``--max-extra-memory``: a fraction of the pipeline's parameter bytes, 0 to 1."""
    if value > 1:
        raise UsageError(
            f"--max-extra-memory {value:g}: expected a fraction of the pipeline's parameter bytes, 0 to 1"
        )
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number, zero or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value
