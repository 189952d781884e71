"""pytest-fluxguard: fuzz a diffusers model with hypothesis and fail on any non-finite pixel.

The pytest plugin lives in :mod:`pytest_fluxguard.plugin`; strategies for your own ``@given``
tests in :mod:`pytest_fluxguard.strategies`. Importing this package loads neither torch nor diffusers.
"""

from .assertions import NonFinitePixels, assert_finite_pixels

__all__ = ["NonFinitePixels", "assert_finite_pixels"]
