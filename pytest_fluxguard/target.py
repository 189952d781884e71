"""What one zero-code item fuzzes: its own module, so collection and the fuzzing both name it
without importing each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Target:
    """Weights, dtype and mode of one item; ``reference_variant`` gives the float32 reference for
    --fluxguard-min-psnr (from ``reference_path`` where it is set: a baked item's original);
    ``lora``, a LoRA loaded on the weights (the reference gets it too)."""

    path: Path
    variant: str | None
    dtype: str
    mode: str
    reference_variant: str | None
    lora: Path | None = None
    reference_path: Path | None = None
