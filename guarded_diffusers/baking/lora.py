"""LoRAs for a baked pipeline: a delta trained on the original weights takes its layer's power of two.

A layer reading cut ``a`` and writing cut ``b`` holds ``weight * 2**(k_a - k_b)`` once baked, and
reads an input ``2**-k_a`` smaller. A LoRA's delta ``s * B @ A`` on it must take the weight's factor
to write the same ``2**-k_b``-scaled output: it goes into ``B`` (``lora_B``, ``lora_up``,
``lora_embedding_B``; DoRA's magnitude too), ``A`` reads the same input as the weight and stays as
it is, a LoRA bias (peft's ``lora_bias``) takes the layer bias's ``2**-k_b``, and a tensor a
checkpoint replaces outright (a control LoRA's norm weights) takes that tensor's exponent. Powers of
two only, so the scaled LoRA is exact in float32. Keys are diffusers' (``save_lora_weights``):
``<component>.<module path>.lora_B.weight``; another format diffusers reads (kohya, xlabs) is
converted by the pipeline class's own ``lora_state_dict`` first.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .record import NotBakedError, file_metadata
from .tensorfile import read_header, tensors_of
from .write import SIDECAR, weight_files, weighted_components

LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "fluxguard-bake-lora"
Exponents = dict[str, dict[str, int]]
HasLayer = Callable[[str, str], bool]

_KEY = re.compile(
    r"^(?P<component>[^.]+)\.(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up"
    r"|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|alpha)(?:\.(?P<rest>.+))?$"
)
_SCALED_LIKE_WEIGHT = {"lora_B", "lora_up", "lora.up", "lora_embedding_B", "lora_magnitude_vector"}


def baked_exponents(folder: str | os.PathLike[str], variant: str | None = None) -> Exponents:
    """``{component: {tensor name: exponent}}`` of the weights ``from_pretrained(folder, variant=)`` loads.

    Read from ``fluxguard-bake.json``; a component counts as baked in that variant only if one of its
    weight files carries the bake's safetensors metadata (``fluxguard bake --variant fp16`` leaves the
    default files as they were). ``NotBakedError`` if the folder holds no bake.
    """
    root = Path(folder)
    try:
        sidecar = json.loads((root / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise NotBakedError(f"{root} is not a baked folder: no readable {SIDECAR}") from None
    exponents = sidecar.get("exponents")
    if not isinstance(exponents, dict):
        raise NotBakedError(f"{root / SIDECAR} lists no exponents")
    stems = dict(weighted_components(root))
    baked: Exponents = {}
    for component, names in exponents.items():
        files = _files(root / component, stems[component], variant) if component in stems else []
        if names and any(file_metadata(path).get("fluxguard-bake") for path in files):
            baked[component] = {str(name): int(value) for name, value in names.items()}
    return baked


def _files(directory: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads for ``variant`` (the default ones without it)."""
    if variant is not None:
        if (directory / f"{stem}.{variant}.safetensors").is_file():
            return [directory / f"{stem}.{variant}.safetensors"]
        index = directory / f"{stem}.safetensors.index.{variant}.json"
        if index.is_file():
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            return [directory / shard for shard in sorted(set(shards))]
    try:
        return weight_files(directory, stem)
    except ValueError:
        return []


def folder_layers(folder: str | os.PathLike[str], variant: str | None = None) -> HasLayer:
    """``has_layer(component, module path)`` for the baked folder, from its files' tensor names."""
    root = Path(folder)
    modules: dict[str, set[str]] = {}
    exponents = json.loads((root / SIDECAR).read_text(encoding="utf-8")).get("exponents", {})
    for component, stem in weighted_components(root):
        names = set(exponents.get(component, {}))  # a tied tensor's other names are not in the files
        for path in _files(root / component, stem, variant):
            with open(path, "rb") as file:
                names |= set(tensors_of(read_header(file)[0]))
        found = modules.setdefault(component, set())
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return lambda component, path: path in modules.get(component, ())


def module_layers(components: Mapping[str, Any]) -> HasLayer:
    """``has_layer(component, module path)`` for a pipeline's loaded components."""

    def has_layer(component: str, path: str) -> bool:
        module = components.get(component)
        if not isinstance(module, torch.nn.Module):
            return False
        try:
            module.get_submodule(path)
        except AttributeError:
            return False
        return True

    return has_layer


def scale_lora(
    state: Mapping[str, torch.Tensor], exponents: Exponents, has_layer: HasLayer
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the LoRA state dict for the baked layers, {key: exponent} of the keys scaled).

    ``NotBakedError`` naming the key when its target layer is not in the baked model, or when the
    power of two it needs is not recorded (a LoRA bias on a scaled layer that has no bias).
    """
    out: dict[str, torch.Tensor] = {}
    applied: dict[str, int] = {}
    for key, tensor in state.items():
        exponent = _exponent(key, exponents, has_layer)
        if exponent and torch.is_tensor(tensor) and tensor.is_floating_point():
            tensor = (tensor.float() * 2.0**exponent).to(tensor.dtype)
            applied[key] = exponent
        out[key] = tensor
    return out, applied


def _exponent(key: str, exponents: Exponents, has_layer: HasLayer) -> int:
    match = _KEY.match(key)
    if match is None:  # a tensor the checkpoint replaces outright (a control LoRA's norm weight)
        component, _, name = key.partition(".")
        module, _, _ = name.rpartition(".")
        if not (module and has_layer(component, module)):
            raise NotBakedError(f"{key}: no layer {component}.{module or name} in the baked model")
        return exponents.get(component, {}).get(name, 0)
    component, path, kind, rest = match["component"], match["path"], match["kind"], match["rest"] or ""
    if not has_layer(component, path):
        raise NotBakedError(f"{key}: no layer {component}.{path} in the baked model")
    scaled = exponents.get(component, {})
    if kind not in _SCALED_LIKE_WEIGHT:
        return 0
    if rest == "bias" or rest.endswith(".bias"):
        if f"{path}.bias" in scaled or f"{path}.weight" not in scaled:
            return scaled.get(f"{path}.bias", 0)
        raise NotBakedError(
            f"{key}: a LoRA bias on {component}.{path}, a scaled layer without a bias: its output's "
            "power of two is not recorded"
        )
    return scaled.get(f"{path}.weight", 0)


def _pipeline_class(folder: Path) -> type:
    import diffusers

    name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not callable(getattr(cls, "lora_state_dict", None)):
        raise NotBakedError(f"{folder} holds a {name}, which does not load LoRAs")
    return cls


def read_lora(
    lora: Mapping[str, torch.Tensor] | str | os.PathLike[str], like: str | os.PathLike[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict in diffusers' keys, the file's safetensors metadata) of a LoRA file, folder or dict,
    read by the baked pipeline class's ``lora_state_dict`` (which converts kohya, xlabs, ...)."""
    cls = _pipeline_class(Path(like))
    if isinstance(lora, Mapping):
        source: Any = dict(lora)
        where: dict[str, Any] = {}
        metadata: dict[str, str] = {}
    else:
        path = Path(lora)
        file = path / LORA_FILE if path.is_dir() else path
        if not file.is_file():
            raise NotBakedError(f"LoRA {file} does not exist")
        source, where = str(file.parent), {"weight_name": file.name}
        try:
            metadata = file_metadata(file)
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError):
            raise NotBakedError(f"LoRA {file} is not a safetensors file") from None
    takes_alphas = "return_alphas" in inspect.signature(cls.lora_state_dict).parameters
    result = cls.lora_state_dict(source, **where, **({"return_alphas": True} if takes_alphas else {}))
    state, alphas = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
    return {**state, **(alphas or {})}, metadata


def bake_lora(
    lora: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    like: str | os.PathLike[str],
    *,
    variant: str | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA ``lora`` (a state dict, a .safetensors file or a folder holding
    ``pytorch_lora_weights.safetensors``), trained on the original weights, for the baked folder
    ``like``: each B matrix of a scaled layer times ``2**`` that layer's weight exponent, the rest
    unchanged. ``variant`` as given to ``from_pretrained(like, variant=)``. ``NotBakedError`` if
    ``like`` holds no bake or a key targets a layer the baked model does not have.
    """
    exponents = baked_exponents(like, variant)
    state, _ = read_lora(lora, like)
    return scale_lora(state, exponents, folder_layers(like, variant))[0]
