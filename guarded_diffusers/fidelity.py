"""How close an image is to a reference: PSNR on [0, 1] images, non-finite pixels shown as black."""

from __future__ import annotations

import math

import numpy as np


def as_displayed(images: np.ndarray) -> np.ndarray:
    """Pixels as a viewer shows them: NaN becomes black, the way numpy's uint8 cast renders it."""
    return np.nan_to_num(np.asarray(images, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``images`` against ``reference`` (both in [0, 1]); inf if equal."""
    error = float(np.mean((as_displayed(images) - as_displayed(reference)) ** 2))
    return math.inf if error == 0.0 else 10.0 * math.log10(1.0 / error)
