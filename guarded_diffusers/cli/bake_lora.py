"""``fluxguard bake-lora LORA --like OUT -o OUT_LORA``: a LoRA trained on the original weights, for a bake.

Paths are checked before torch loads; the LoRA is read as the baked pipeline class reads it
(``lora_state_dict``), each B matrix of a scaled layer takes the layer's power of two
(``guarded_diffusers.bake_lora``), and the result is written with the source file's metadata
(diffusers' adapter config among it) plus the exponents applied, through a temporary file renamed
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..demo import quiet
from .inputs import UsageError, pipeline_folder

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
SIDECAR = "fluxguard-bake.json"  # baking.write.SIDECAR, without importing torch


def _lora_file(path: Path) -> Path:
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"LoRA {file} does not exist")
    if file.suffix != ".safetensors":
        raise UsageError(f"LoRA {file} is not a .safetensors file")
    return file


def _output_file(path: Path, overwrite: bool) -> Path:
    """A .safetensors path is the file; any other is a folder to hold ``pytorch_lora_weights.safetensors``."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    return path if path.suffix == ".safetensors" else path / LORA_FILE


def run_bake_lora_command(args: argparse.Namespace) -> int:
    """Check the paths, scale the LoRA for the bake, write it; 0 written, 2 on bad input."""
    lora = _lora_file(args.lora)
    pipeline_folder(args.like)
    if not (args.like / SIDECAR).is_file():
        raise UsageError(f"{args.like} is not a baked folder: no {SIDECAR} (make one with fluxguard bake)")
    target = _output_file(args.output, args.overwrite)
    quiet()
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..baking.lora import METADATA_KEY, baked_exponents, folder_layers, read_lora, scale_lora

    try:
        exponents = baked_exponents(args.like, args.variant)
        state, metadata = read_lora(lora, args.like)
        scaled, applied = scale_lora(state, exponents, folder_layers(args.like, args.variant))
    except (ValueError, OSError, SafetensorError) as error:  # not a bake, not a LoRA, a layer missing
        raise UsageError(str(error)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    save_file(scaled, str(partial), metadata={**metadata, "format": "pt", METADATA_KEY: json.dumps(applied)})
    os.replace(partial, target)
    layers = {key.rpartition(".lora")[0] for key in applied}
    print(
        f"scaled {len(applied)} of {len(scaled)} LoRA tensors ({len(layers)} layers) by powers of two; "
        f"wrote {target}"
    )
    return 0
