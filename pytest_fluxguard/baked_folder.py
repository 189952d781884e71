"""The ``--fluxguard-baked`` folder: one item checks its float16-safe weights against the original.

Collection reads ``model_index.json``, ``fluxguard-bake.json`` and the weight files' headers only,
so it needs neither torch nor diffusers. The original is ``--fluxguard-original``, or, where the bake
is a variant (``fluxguard bake --variant fp16``), the baked folder's own default weights, which the
bake left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guarded_diffusers import NotBakedError, read_bake

from .collect import OPTIONS_KEY, FluxGuardItem
from .model_folder import NotAPipelineFolder, pipeline_class, variant_label, weight_variants
from .target import Target

MODE = "baked"
DTYPE = "float16"  # what a bake is for


class NotABake(Exception):
    """The baked folder or its original cannot be checked; the message names the option."""


def _original(baked: Path, variant: str | None, original: Path | None) -> Path:
    """The folder holding the original weights as their default weights; raises NotABake."""
    if original is None:
        if variant is None:
            raise NotABake(
                f"--fluxguard-baked: {baked} holds the bake in its default weights, so not the original: "
                "pass --fluxguard-original SRC, the folder fluxguard bake read."
            )
        return baked
    try:
        weight_variants(original, pipeline=pipeline_class(baked))
    except NotAPipelineFolder as error:
        raise NotABake(f"--fluxguard-original: {error}") from None
    try:
        baked_there = read_bake(original).variant is None
    except NotBakedError:
        baked_there = False
    if baked_there:
        raise NotABake(
            f"--fluxguard-original: {original} holds a bake in its default weights: pass the folder "
            "fluxguard bake read."
        )
    return original


def baked_target(baked: Path, original: Path | None) -> Target:
    """The float16 weights of the bake in ``baked``, with its original as the reference; raises NotABake."""
    try:
        weight_variants(baked, pipeline=None)
        record = read_bake(baked)
    except (NotAPipelineFolder, NotBakedError) as error:
        raise NotABake(f"--fluxguard-baked: {error}") from None
    reference = _original(baked, record.variant, original)
    return Target(baked, record.variant, DTYPE, MODE, reference_variant=None, reference_path=reference)


class FluxGuardBaked(pytest.Collector):
    """The baked folder; fails collection once, with the reason, when it cannot be checked."""

    def collect(self) -> Iterator[FluxGuardItem]:
        try:
            target = baked_target(self.path, self.config.stash[OPTIONS_KEY].original)
        except NotABake as error:
            raise self.CollectError(str(error)) from None
        name = f"{variant_label(target.variant)}/{DTYPE}/{MODE}"
        yield FluxGuardItem.from_parent(self, name=name, target=target)
