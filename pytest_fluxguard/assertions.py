"""The one check every fluxguard test makes: no pixel value is NaN or infinite."""

from __future__ import annotations

from typing import Any


class NonFinitePixels(AssertionError):
    """Pixels came out NaN or infinite: a black or broken image that nothing else would flag."""


def _as_array(images: Any) -> Any:
    import numpy as np

    if hasattr(images, "detach"):  # a torch tensor, from output_type="pt"
        return images.detach().float().cpu().numpy()
    if isinstance(images, list) and images and not hasattr(images[0], "shape"):
        raise TypeError(
            "assert_finite_pixels needs pixel values: PIL images were already cast to uint8, "
            "where NaN turns black. Call the pipeline with output_type='np' or 'pt'."
        )
    return np.asarray(images)


def describe_non_finite(images: Any) -> str | None:
    """How many values are NaN or inf and where the first one is; None when all are finite."""
    import numpy as np

    pixels = _as_array(images)
    bad = ~np.isfinite(pixels)
    if not bad.any():
        return None
    nans = int(np.isnan(pixels).sum())
    first = ", ".join(str(int(index)) for index in np.argwhere(bad)[0])
    return (
        f"{int(bad.sum())} of {pixels.size} pixel values are non-finite "
        f"({nans} NaN, {int(bad.sum()) - nans} inf); first at index ({first}) of shape {pixels.shape}"
    )


def assert_finite_pixels(images: Any, report: object = None) -> None:
    """Fail unless every value of ``images`` (numpy array or torch tensor) is finite.

    Pass the output's ``guard_report`` as ``report`` to show what the guard saw.
    """
    problem = describe_non_finite(images)
    if problem is not None:
        raise NonFinitePixels(problem if report is None else f"{problem}\nguard report:\n{report}")
