"""How faithful a fix must be and how much memory fixes may hold: the guard's user settings.

Checked when a pipeline is loaded, before any weight is read, so a typo is a ``ValueError``
naming the argument instead of a surprise in the middle of a run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

# A fix's region may differ from float32 by this much (relative L2): bfloat16's rounding unit,
# so a fix called "recovered" is never less faithful than bfloat16 would have been there.
DEFAULT_TOLERANCE = 2.0**-8
# Everything the fixes hold at once may add this fraction of the pipeline's parameter bytes.
DEFAULT_MAX_EXTRA_MEMORY = 0.05
FIDELITY_MODES = ("best", "strict")
Fidelity = Literal["best", "strict"]


@dataclasses.dataclass(frozen=True)
class GuardOptions:
    """``fidelity``: ``"best"`` keeps the most faithful finite fix when none meets ``tolerance``
    (reported as degraded, with a warning); ``"strict"`` raises ``NonFiniteError`` instead.
    ``max_extra_memory``: a fraction (float) of the pipeline's parameter bytes, or bytes (int).
    """

    fidelity: Fidelity = "best"
    tolerance: float = DEFAULT_TOLERANCE
    max_extra_memory: float | int = DEFAULT_MAX_EXTRA_MEMORY

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITY_MODES:
            raise ValueError(
                f"`guard_fidelity` must be one of {', '.join(map(repr, FIDELITY_MODES))}, "
                f"not {self.fidelity!r}."
            )
        tolerance = self.tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 < tolerance < 1:
            raise ValueError(
                f"`guard_tolerance` must be a relative error in (0, 1), such as 2**-8, not {tolerance!r}."
            )
        budget = self.max_extra_memory
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
            raise ValueError(
                "`guard_max_extra_memory` must be a fraction of the pipeline's parameter bytes (a float "
                f"such as 0.05) or a number of bytes (an int), not {budget!r}."
            )
        if budget < 0 or (isinstance(budget, float) and budget > 1):
            raise ValueError(
                "`guard_max_extra_memory` must be a fraction in [0, 1] (float) or bytes >= 0 (int), "
                f"not {budget!r}."
            )

    def budget_bytes(self, parameter_bytes: int) -> int:
        """The bytes all held fixes may add, for a pipeline holding ``parameter_bytes``."""
        if isinstance(self.max_extra_memory, float):
            return int(self.max_extra_memory * parameter_bytes)
        return self.max_extra_memory
