"""How close a result is to its float32 reference: PSNR of images, relative L2 of activations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .checks import floating_tensors


def as_displayed(images: np.ndarray) -> np.ndarray:
    """Pixels as a viewer shows them: NaN becomes black, the way numpy's uint8 cast renders it."""
    return np.nan_to_num(np.asarray(images, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``images`` against ``reference`` (both in [0, 1]); inf if equal."""
    error = float(np.mean((as_displayed(images) - as_displayed(reference)) ** 2))
    return math.inf if error == 0.0 else 10.0 * math.log10(1.0 / error)


def relative_l2(output: Any, reference: Any) -> float:
    """``||output - reference|| / ||reference||`` over every floating tensor of two like structures.

    Computed in float32 on the tensors' device; NaN or inf anywhere in ``output`` gives inf.
    """
    pairs = list(zip(floating_tensors(output), floating_tensors(reference), strict=True))
    if not pairs:
        return 0.0
    difference = math.sqrt(sum(float((o.float() - r.float()).square().sum()) for o, r in pairs))
    scale = math.sqrt(sum(float(r.float().square().sum()) for _, r in pairs))
    if not math.isfinite(difference):
        return math.inf
    return difference / scale if scale else difference
