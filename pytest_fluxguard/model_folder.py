"""What a model folder holds: which diffusers pipeline class, and which weight variants it ships.

Read from file names and model_index.json only, so collection needs neither torch nor diffusers.
diffusers names variant weights ``<name>.<variant>.safetensors`` (shards
``<name>-00001-of-00002.<variant>.safetensors``, index ``<name>.safetensors.index.<variant>.json``);
the default weights are the same names without the variant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

_WEIGHTS = re.compile(r"^[^.]+(?:\.(?P<variant>[^.]+))?\.(?:safetensors|bin)$")
_INDEX = re.compile(r"^[^.]+\.(?:safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")


class NotAPipelineFolder(Exception):
    """The folder cannot be fuzzed; the message says what is missing or wrong."""


NotAFluxFillModel = NotAPipelineFolder  # the name the fluxguard command's Flux Fill checks import
FLUX_FILL = "FluxFillPipeline"


class NotALoRA(Exception):
    """A --fluxguard-lora path holds no LoRA weights; the message says why."""


def variant_label(variant: str | None) -> str:
    """How a variant reads in an item id: ``weights`` for the default, ``fp16-weights`` for ``fp16``."""
    return "weights" if variant is None else f"{variant}-weights"


def _index(folder: Path, expected: str | None) -> dict:
    index_file = folder / "model_index.json"
    if not folder.is_dir():
        raise NotAPipelineFolder(f"{folder} is not a folder.")
    if not index_file.is_file():
        raise NotAPipelineFolder(f"{folder} has no model_index.json, so it is not a diffusers pipeline.")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NotAPipelineFolder(f"{index_file} is not valid JSON: {error}.") from None
    found = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(found, str) or not found:
        raise NotAPipelineFolder(f"{index_file} names {found!r}, not a diffusers pipeline class.")
    if expected is not None and found != expected:
        raise NotAPipelineFolder(f"{index_file} names {found!r}, not {expected!r}.")
    return index


def pipeline_class(folder: Path) -> str:
    """The pipeline class ``model_index.json`` names, e.g. ``FluxFillPipeline``; raises NotAPipelineFolder."""
    return _index(folder, None)["_class_name"]


def _components(folder: Path, expected: str | None) -> list[str]:
    index = _index(folder, expected)
    return [name for name, entry in index.items() if not name.startswith("_") and isinstance(entry, list)]


def weight_variants(folder: Path, pipeline: str | None = FLUX_FILL) -> list[str | None]:
    """Variants with weights in ``folder``, the default (``None``) first; raises NotAPipelineFolder,
    also when the folder's class is not ``pipeline`` (None takes any pipeline class)."""
    found: set[str | None] = set()
    for component in _components(folder, pipeline):
        directory = folder / component
        if not directory.is_dir():
            continue
        for file in directory.iterdir():
            match = _WEIGHTS.match(file.name) or _INDEX.match(file.name)
            if match:
                found.add(match["variant"])
    if not found:
        raise NotAPipelineFolder(f"{folder} has no weight files (*.safetensors or *.bin) in its components.")
    return sorted(found, key=lambda variant: (variant is not None, variant or ""))


def check_lora(path: Path) -> None:
    """Raise NotALoRA unless ``path`` is a LoRA file or a folder holding LoRA weights."""
    if path.is_file() and path.suffix in (".safetensors", ".bin"):
        return
    if not path.is_dir():
        raise NotALoRA(f"{path} is neither a folder nor a .safetensors file.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise NotALoRA(
            f"{path} holds no LoRA weights (*.safetensors, as pipe.save_lora_weights(folder) writes)."
        )


def lora_labels(paths: Sequence[Path]) -> list[str]:
    """How each LoRA reads in an item id: ``<name>-lora``, numbered where two names are the same."""
    labels, seen = [], {}
    for path in paths:
        label = f"{path.stem if path.is_file() else path.name}-lora"
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return labels
