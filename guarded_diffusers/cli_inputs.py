"""The fluxguard command's input checks: every bad path or file is one clear line, before any model runs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pytest_fluxguard.model_folder import NotAFluxFillModel, weight_variants

from .plan import PrecisionPlan


class UsageError(Exception):
    """Bad input: the command prints the message on one line and exits with status 2."""


def model_folder(path: Path) -> Path:
    """``path`` if it holds a Flux Fill pipeline saved with ``save_pretrained``."""
    if not path.exists():
        raise UsageError(f"model folder {path} does not exist")
    try:
        weight_variants(path)
    except NotAFluxFillModel as error:
        raise UsageError(f"{path} is not a Flux Fill model: {str(error).rstrip('.')}") from None
    return path


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
    from .plugins import resolve_strategies  # loads the strategies, hence torch

    names = [] if text.strip() == "none" else [name.strip() for name in text.split(",") if name.strip()]
    try:
        resolve_strategies(names)
    except ValueError as error:
        raise UsageError(f"--strategies {text}: {str(error).rstrip('.')}") from None
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


def non_negative(text: str) -> float:
    """argparse type: a finite number, zero or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value
