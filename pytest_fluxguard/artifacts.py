"""PNGs of a failing example: what the model made, and the mask and image it was given, if any."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .inputs import FillInputs


def folder_for(root: Path, item_name: str) -> Path:
    """A folder per item named after its id: ``fp16-weights/float16/raw`` -> ``fp16-weights-float16-raw``."""
    return root / re.sub(r"[^A-Za-z0-9_.-]+", "-", item_name)


def save_failure(folder: Path, example: FillInputs, images: Any | None) -> list[Path]:
    """Save the outputs as displayed (NaN black), the mask and the image if drawn; returns the paths written.

    ``images`` are the pipeline's numpy output in [0, 1], or None when the call raised before output.
    """
    import numpy as np
    from PIL import Image

    from guarded_diffusers import as_displayed

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    written = []
    if images is not None:
        pixels = np.rint(as_displayed(images) * 255).astype(np.uint8)
        for index, picture in enumerate(pixels):
            written.append(folder / f"output-{index}.png")
            Image.fromarray(picture).save(written[-1])
    for name, picture in (("mask", example.mask_image), ("image", example.image)):
        if picture is None:
            continue
        written.append(folder / f"{name}.png")
        picture.save(written[-1])
    return written
