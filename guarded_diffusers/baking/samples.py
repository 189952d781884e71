"""Calibration calls drawn the way the scan draws its samples, shaped by the pipeline's own call.

Kept apart from ``run``: the scan's samples come from the pytest plugin's strategies, which import
the package's public names, and ``bake`` is one of them.
"""

from __future__ import annotations

from typing import Any

from pytest_fluxguard.calls import call_shape

from ..scan.samples import draw_samples
from .calibrate import Call


def scan_calls(
    pipe: Any, samples: int = 2, max_size: int = 64, max_steps: int = 2, max_sequence_length: int = 32
) -> list[Call]:
    """``samples`` deterministic calls for ``pipe`` (``scan.samples.draw_samples``), each with a ``seed``."""
    examples = draw_samples(
        samples,
        shape=call_shape(pipe),
        max_size=max_size,
        max_steps=max_steps,
        max_sequence_length=max_sequence_length,
        max_guidance=30.0,
    )
    calls = []
    for example in examples:
        arguments = example.pipeline_kwargs()
        arguments.pop("generator")
        calls.append({**arguments, "seed": example.seed})
    return calls
