"""What a baked folder says about itself: ``fluxguard-bake.json`` and its files' safetensors metadata.

Read without torch, so a pytest collection or a command's argument check can look at a bake before
anything heavy loads. The json lists each cut that needed scaling (its ``k``, float32 calibration
peak, readers and writers, by the pipeline's module paths); the variant holding the bake is the one
whose files carry the bake's metadata (``fluxguard bake --variant fp16`` leaves the default files,
the originals, as they were).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

SIDECAR = "fluxguard-bake.json"
METADATA_KEY = "fluxguard-bake"
# ``<stem>.<variant>.safetensors``: the bake writes a variant as one file per model.
_VARIANT_FILE = re.compile(r"^[^.]+\.(?P<variant>[^.]+)\.safetensors$")


class NotBakedError(ValueError):
    """The folder is not a bake (no ``fluxguard-bake.json``), or a LoRA does not fit it."""


@dataclasses.dataclass(frozen=True)
class BakedCut:
    """A cut as the bake recorded it: scaled by ``2**-k`` at its ``writers``, read by its ``readers``
    (normalisations, by pipeline module path: ``vae.decoder.up_blocks.0.resnets.0.norm2``).

    ``peak`` is the float32 calibration peak before scaling; ``breaks`` says why a cut that needed
    scaling was left at ``k = 0``.
    """

    name: str
    k: int
    peak: float
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    breaks: str | None = None


@dataclasses.dataclass(frozen=True)
class BakeRecord:
    """A baked folder: the variant ``from_pretrained(folder, variant=...)`` loads the baked weights
    with (None: the default weights), the cuts it scaled or could not, and the modules it left
    overflowing float16."""

    folder: Path
    variant: str | None
    cuts: tuple[BakedCut, ...]
    remaining: tuple[str, ...]


def file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` strings (its header only, no tensor is read)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(length)).get("__metadata__") or {}


def _peak(value: Any) -> float:
    return math.inf if value == "inf" else float(value)


def _cut(entry: dict[str, Any]) -> BakedCut:
    return BakedCut(
        name=str(entry["cut"]),
        k=int(entry["k"]),
        peak=_peak(entry["peak"]),
        readers=tuple(entry["readers"]),
        writers=tuple(entry["writers"]),
        breaks=entry.get("breaks"),
    )


def baked_variant(folder: Path) -> str | None:
    """The variant whose weight files the bake wrote (they carry its metadata); None: the default files."""
    for path in sorted(folder.glob("*/*.safetensors")):
        match = _VARIANT_FILE.match(path.name)
        if match and METADATA_KEY in file_metadata(path):
            return match["variant"]
    return None


def read_bake(folder: str | os.PathLike[str]) -> BakeRecord:
    """The bake in ``folder`` (written by ``fluxguard bake`` or ``write_baked``); ``NotBakedError`` if
    it holds none or its ``fluxguard-bake.json`` is not one."""
    root = Path(folder)
    sidecar = root / SIDECAR
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotBakedError(
            f"{root} is not a baked folder: it has no {SIDECAR} (fluxguard bake writes one)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotBakedError(f"{sidecar} is not readable JSON: {error}") from None
    try:
        if not isinstance(data.get("exponents"), dict):
            raise TypeError("no exponents")
        cuts = tuple(_cut(entry) for entry in data["cuts"])
        remaining = tuple(str(item["module"]) for item in data.get("remaining", ()))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise NotBakedError(f"{sidecar} is not a bake's record ({error})") from None
    try:
        variant = baked_variant(root)
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotBakedError(f"{root} holds a weight file that is not safetensors: {error}") from None
    return BakeRecord(root, variant, cuts, remaining)
