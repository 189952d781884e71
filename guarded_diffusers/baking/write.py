"""Write a bake: a copy of the pipeline folder whose changed tensors are scaled, nothing else new.

Every file of SRC is copied as is; only the safetensors files holding scaled tensors are
rewritten, streamed one tensor at a time (a 10 GB shard never sits in memory), with the same
tensor names, shapes and dtypes (a power of two is exact in any float format, save where a
float16-stored value becomes subnormal) and the file's own metadata plus ``fluxguard-bake``
(that file's exponents). The exponents, cuts and checks are also in ``fluxguard-bake.json`` at
the folder's root: no config key changes, so plain diffusers loads it without warnings. With
``variant="fp16"`` the originals stay and every model gets one float16
``<stem>.fp16.safetensors`` beside them, baked, which ``from_pretrained(variant="fp16")`` picks.
Everything is written into a hidden staging folder first and renamed at the end, so a failure
leaves nothing at OUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .record import METADATA_KEY, SIDECAR
from .run import BakeResult
from .tensorfile import DTYPES, read_header, read_tensor, tensors_of, write_streamed

PLAN_FILE = "fluxguard-plan.json"
VARIANTS = {"fp16": torch.float16}
_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_BLOCK = re.compile(r"^(.*?\.\d+)\.")
# A tensor's exponent: one for all of it, or (start, stop, k) runs of its rows (a slice of a fused
# tensor, such as a single-file checkpoint's qkv); rows in no run keep their values.
Exponent = int | list[tuple[int, int, int]]


class BakeWriteError(ValueError):
    """The folder cannot take the bake (weights not in safetensors, a scaled tensor not found)."""


def weighted_components(folder: Path) -> Iterator[tuple[str, str]]:
    """(component, weights stem) of every model component in ``model_index.json``."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if entry[0] in _STEMS and (folder / name / "config.json").is_file():
            yield name, _STEMS[entry[0]]


def weight_files(directory: Path, stem: str) -> list[Path]:
    """The safetensors files of the default (non-variant) weights: one file or an index's shards."""
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [directory / shard for shard in sorted(set(weight_map.values()))]
    raise BakeWriteError(f"{directory} has no {stem}.safetensors: the bake reads and writes safetensors only")


def check_source(src: Path) -> None:
    """``BakeWriteError`` before any calibration if a model's weights are not safetensors."""
    for component, stem in weighted_components(src):
        weight_files(src / component, stem)


def _scaled(tensor: torch.Tensor, exponent: Exponent, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """``tensor * 2**exponent`` in ``dtype`` (default: its own); refused where that overflows."""
    if not tensor.is_floating_point():
        return tensor
    target = dtype or tensor.dtype
    if isinstance(exponent, int):
        scaled = (tensor.float() * 2.0**exponent).to(target) if exponent else tensor.to(target)
    else:
        scaled = tensor.float()  # a fresh read: scaled in place, run by run
        for start, stop, k in exponent:
            scaled[start:stop] *= 2.0**k
        scaled = scaled.to(target)
    if not torch.isfinite(scaled).all() and torch.isfinite(tensor).all():
        raise BakeWriteError(f"{name} does not fit {target} once scaled by 2**{exponent}")
    return scaled


def stream_file(
    sources: list[Path],
    target: Path,
    exponents: Mapping[str, Exponent],
    dtype: torch.dtype | None = None,
    tick: Callable[[str], None] = lambda _: None,
    metadata: Mapping[str, str] | None = None,
) -> set[str]:
    """Every tensor of ``sources`` into one safetensors ``target``, scaled, one tensor in memory at a time.

    ``dtype`` casts the floating tensors (a variant); ``metadata`` joins the files' own; returns the
    names scaled.
    """
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(path, "rb")) for path in sources]
        kept: dict[str, str] = {}
        where: dict[str, tuple[BinaryIO, dict, int]] = {}
        for file in files:
            header, start = read_header(file)
            kept.update(header.get("__metadata__") or {})
            for key, entry in tensors_of(header).items():
                where[key] = (file, entry, start)
        mine = {key: exponents[key] for key in where if key in exponents}
        entries = []
        for key, (_, entry, _) in where.items():
            stored = DTYPES[entry["dtype"]]
            entries.append(
                (key, dtype if dtype is not None and stored.is_floating_point else stored, entry["shape"])
            )
        block: list[str | None] = [None]

        def produce(key: str) -> torch.Tensor:
            match = _BLOCK.match(key)
            if match and match[1] != block[0]:
                block[0] = match[1]
                tick(match[1])
            file, entry, start = where[key]
            out_dtype = dtype if dtype is not None and DTYPES[entry["dtype"]].is_floating_point else None
            return _scaled(read_tensor(file, entry, start), exponents.get(key, 0), out_dtype, key)

        partial = target.with_name(target.name + ".partial")
        write_streamed(
            partial, entries, produce, {**kept, **(metadata or {}), METADATA_KEY: json.dumps(mine)}
        )
    mode = sources[0].stat().st_mode
    os.replace(partial, target)
    target.chmod(mode)
    return set(mine)


def write_baked(
    src: Path,
    out: Path,
    result: BakeResult,
    *,
    variant: str | None = None,
    overwrite: bool = False,
    plan: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``result`` for the pipeline folder ``src`` into ``out``; returns the files written."""
    tick = progress or (lambda _: None)
    if out.exists() and not overwrite:
        raise BakeWriteError(f"{out} exists (pass --overwrite to replace it)")
    if out.resolve().is_relative_to(src.resolve()):
        raise BakeWriteError(f"{out} is inside {src}: write the bake to a folder outside it")
    dtype = VARIANTS[variant] if variant is not None else None
    staging = out.parent / f".{out.name}.baking"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging)
    written: list[Path] = []
    try:
        for component, stem in weighted_components(staging):
            exponents = result.scaling.exponents.get(component, {})
            if not exponents and variant is None:
                continue
            tick(component)
            found: set[str] = set()
            sources = weight_files(staging / component, stem)
            if variant is None:
                for path in sources:
                    if _holds_any(path, exponents):
                        found |= stream_file([path], path, exponents, None, tick)
                        written.append(out / component / path.name)
            else:
                variant_file = staging / component / f"{stem}.{variant}.safetensors"
                found |= stream_file(sources, variant_file, exponents, dtype, tick)
                written.append(out / component / variant_file.name)
            _check_found(component, found, result)
        (staging / SIDECAR).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        written.append(out / SIDECAR)
        if plan and result.plan.entries:
            result.plan.save(staging / PLAN_FILE)
            written.append(out / PLAN_FILE)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _holds_any(path: Path, names: dict[str, int]) -> bool:
    with open(path, "rb") as file:
        return any(key in names for key in tensors_of(read_header(file)[0]))


def _check_found(component: str, found: set[str], result: BakeResult) -> None:
    """Every scaled tensor must be in the files under one of its names (tied ones under any)."""
    lost = [names[0] for names in result.scaling.aliases.get(component, []) if not found.intersection(names)]
    if lost:
        raise BakeWriteError(
            f"{component}: scaled tensors missing from its weights files: {', '.join(lost[:3])}"
        )
