"""Deterministic builders of masks, images and prompts from a few numbers.

Each picture remembers the call that built it (``recipe(picture)``, e.g.
``rectangle_mask(height=32, width=32, top=0, left=3, rows=8, columns=32)``), so a failing example
prints as calls that can be pasted into a test to replay it; PIL's own repr says only the size.
Masks are ``L`` images, 255 where Flux Fill paints; images are RGB.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "blob_mask",
    "border_mask",
    "empty_mask",
    "exposed_image",
    "extreme_image",
    "flat_image",
    "full_mask",
    "gradient_image",
    "noise_image",
    "outpaint_mask",
    "recipe",
    "rectangle_mask",
    "repeated_words",
    "stroke_mask",
]

EXTREME_PATTERNS = ("black", "white", "checker", "stripes")
BORDER_SIDES = ("top", "bottom", "left", "right")


_RECIPE = "fluxguard_recipe"


def recipe(picture: Image.Image) -> str:
    """The call that built ``picture``, or PIL's repr for a picture built elsewhere."""
    return picture.info.get(_RECIPE, repr(picture))


def _recorded(build: Callable[..., Image.Image]) -> Callable[..., Image.Image]:
    signature = inspect.signature(build)

    @functools.wraps(build)
    def recorded(*args: object, **kwargs: object) -> Image.Image:
        picture = build(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        picture.info[_RECIPE] = f"{build.__name__}({', '.join(f'{k}={v!r}' for k, v in bound.items())})"
        return picture

    return recorded


def _mask(painted: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8))


@_recorded
def empty_mask(height: int, width: int) -> Image.Image:
    """Nothing to paint: the output should reproduce the image."""
    return _mask(np.zeros((height, width), dtype=bool))


@_recorded
def full_mask(height: int, width: int) -> Image.Image:
    """Paint everything: no pixel of the image survives into the masked-image latents."""
    return _mask(np.ones((height, width), dtype=bool))


@_recorded
def rectangle_mask(height: int, width: int, top: int, left: int, rows: int, columns: int) -> Image.Image:
    """A ``rows`` x ``columns`` rectangle from (``top``, ``left``), cut off where it leaves the picture."""
    painted = np.zeros((height, width), dtype=bool)
    painted[top : top + rows, left : left + columns] = True
    return _mask(painted)


@_recorded
def outpaint_mask(height: int, width: int, top: int, left: int, rows: int, columns: int) -> Image.Image:
    """Everything painted but a ``rows`` x ``columns`` rectangle from (``top``, ``left``): outpainting."""
    painted = np.ones((height, width), dtype=bool)
    painted[top : top + rows, left : left + columns] = False
    return _mask(painted)


@_recorded
def border_mask(height: int, width: int, side: str, thickness: int) -> Image.Image:
    """A band ``thickness`` pixels wide along one side of the picture."""
    painted = np.zeros((height, width), dtype=bool)
    band = {
        "top": (slice(0, thickness), slice(None)),
        "bottom": (slice(height - thickness, None), slice(None)),
        "left": (slice(None), slice(0, thickness)),
        "right": (slice(None), slice(width - thickness, None)),
    }[side]
    painted[band] = True
    return _mask(painted)


@_recorded
def blob_mask(height: int, width: int, discs: Sequence[tuple[int, int, int]]) -> Image.Image:
    """The union of discs given as (centre row, centre column, radius)."""
    rows, columns = np.ogrid[:height, :width]
    painted = np.zeros((height, width), dtype=bool)
    for row, column, radius in discs:
        painted |= (rows - row) ** 2 + (columns - column) ** 2 <= radius**2
    return _mask(painted)


@_recorded
def stroke_mask(height: int, width: int, start: tuple[int, int], end: tuple[int, int]) -> Image.Image:
    """A one-pixel line from ``start`` to ``end`` (row, column), the thinnest region a user paints."""
    steps = max(abs(end[0] - start[0]), abs(end[1] - start[1])) + 1
    rows = np.rint(np.linspace(start[0], end[0], steps)).astype(int)
    columns = np.rint(np.linspace(start[1], end[1], steps)).astype(int)
    painted = np.zeros((height, width), dtype=bool)
    painted[rows, columns] = True
    return _mask(painted)


@_recorded
def noise_image(height: int, width: int, seed: int) -> Image.Image:
    """Uniform random pixels from ``seed``: every value in every channel."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@_recorded
def flat_image(height: int, width: int, colour: tuple[int, int, int]) -> Image.Image:
    """One colour everywhere."""
    return Image.new("RGB", (width, height), colour)


@_recorded
def gradient_image(
    height: int, width: int, start: tuple[int, int, int], end: tuple[int, int, int], vertical: bool
) -> Image.Image:
    """A linear ramp from ``start`` to ``end`` colour, top to bottom or left to right."""
    length = height if vertical else width
    ramp = np.linspace(np.asarray(start, dtype=float), np.asarray(end, dtype=float), length)
    pixels = ramp[:, None, :] if vertical else ramp[None, :, :]
    pixels = np.broadcast_to(np.rint(pixels).astype(np.uint8), (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(pixels))


@_recorded
def exposed_image(height: int, width: int, seed: int, exposure: float) -> Image.Image:
    """A smooth random picture (4 x 4 colours, interpolated) at ``exposure`` times its contrast, clipped:
    from 2 or so, broad regions blow out to white and black, as in an overexposed photo."""
    corners = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(4, 4, 3))
    rows = np.linspace(0.0, 3.0, height)
    columns = np.linspace(0.0, 3.0, width)
    row0, column0 = np.minimum(rows.astype(int), 2), np.minimum(columns.astype(int), 2)
    row_t, column_t = (rows - row0)[:, None, None], (columns - column0)[None, :, None]
    top = corners[row0][:, column0] * (1 - column_t) + corners[row0][:, column0 + 1] * column_t
    bottom = corners[row0 + 1][:, column0] * (1 - column_t) + corners[row0 + 1][:, column0 + 1] * column_t
    smooth = top * (1 - row_t) + bottom * row_t
    pixels = np.clip(127.5 + 127.5 * exposure * smooth, 0.0, 255.0)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


@_recorded
def extreme_image(height: int, width: int, pattern: str) -> Image.Image:
    """Saturated pixels only (0 and 255): all black, all white, a checkerboard or stripes."""
    rows, columns = np.indices((height, width))
    white = {
        "black": np.zeros((height, width), dtype=bool),
        "white": np.ones((height, width), dtype=bool),
        "checker": (rows + columns) % 2 == 1,
        "stripes": columns % 2 == 1,
    }[pattern]
    pixels = np.repeat(np.where(white, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)
    return Image.fromarray(pixels)


def repeated_words(word: str, count: int) -> str:
    """``count`` copies of ``word`` separated by spaces: at least ``count`` tokens for any tokenizer."""
    return " ".join([word] * count)
