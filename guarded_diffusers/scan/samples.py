"""The scan's inputs: a fixed number of pipeline calls drawn from the pytest plugin's strategies.

The scan must see the inputs the fuzzer would try (empty and full masks, saturated images, long
prompts, large guidance), so it draws from ``pytest_fluxguard.strategies.call_inputs``, shaped by
the pipeline's own call (text to image draws no image or mask), rather than from generators of
its own. Drawing is derandomised and skips hypothesis' database, so every process of a distributed
scan, and every later scan with the same arguments, gets the same list.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings

from pytest_fluxguard.calls import CallShape
from pytest_fluxguard.inputs import FillInputs
from pytest_fluxguard.strategies import call_inputs


def draw_samples(
    count: int,
    *,
    shape: CallShape,
    max_size: int,
    max_steps: int,
    max_sequence_length: int,
    max_guidance: float,
) -> list[FillInputs]:
    """``count`` deterministic examples of one-image calls of a pipeline of ``shape``, the same every time."""
    drawn: list[FillInputs] = []
    strategy = call_inputs(
        shape,
        max_size=max_size,
        max_steps=max_steps,
        max_images=1,
        max_sequence_length=max_sequence_length,
        max_guidance=max_guidance,
    )

    @settings(
        settings.get_profile("default"),
        max_examples=count,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: FillInputs) -> None:
        drawn.append(example)

    collect()
    return drawn[:count]
