"""Zero-code items: one per weight variant x dtype x mode of the ``--fluxguard-model`` folder, or,
with ``--fluxguard-lora``, one per LoRA x dtype x mode on the model's default weights.

Collecting reads file names only; torch, diffusers and hypothesis load when the first item runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .failures import FluxGuardFailure
from .model_folder import (
    NotALoRA,
    NotAPipelineFolder,
    check_lora,
    lora_labels,
    pipeline_class,
    variant_label,
    weight_variants,
)
from .options import FluxGuardOptions
from .pipelines import PipelineCache
from .summary import ItemStats
from .target import Target

OPTIONS_KEY = pytest.StashKey[FluxGuardOptions]()
PIPELINES_KEY = pytest.StashKey[PipelineCache]()


def collector_name(model: Path, rootdir: Path) -> str:
    """The model folder as a node id reads it: relative to rootdir when inside it, else its name."""
    if model != rootdir and model.is_relative_to(rootdir):
        return model.relative_to(rootdir).as_posix()
    return model.name


class FluxGuardModel(pytest.Collector):
    """The model folder; fails collection once, with the reason, when it is not a diffusers pipeline."""

    def collect(self) -> Iterator[FluxGuardItem]:
        options = self.config.stash[OPTIONS_KEY]
        try:
            variants = weight_variants(self.path, pipeline=None)
        except NotAPipelineFolder as error:
            raise self.CollectError(f"--fluxguard-model: {error}") from None
        if options.loras:
            found = pipeline_class(self.path)
            if not found.startswith("Flux"):  # the scale travels as Flux's joint_attention_kwargs
                raise self.CollectError(f"--fluxguard-lora: LoRA items take Flux pipelines, not {found}.")
            for lora in options.loras:
                try:
                    check_lora(lora)
                except NotALoRA as error:
                    raise self.CollectError(f"--fluxguard-lora: {error}") from None
            for lora, label in zip(options.loras, lora_labels(options.loras), strict=True):
                yield from self._items(label, variants[0], variants[0], lora)
            return
        for variant in variants:
            yield from self._items(variant_label(variant), variant, variants[0], None)

    def _items(
        self, label: str, variant: str | None, reference: str | None, lora: Path | None
    ) -> Iterator[FluxGuardItem]:
        options = self.config.stash[OPTIONS_KEY]
        for dtype in options.dtypes:
            for mode in options.modes:
                target = Target(self.path, variant, dtype, mode, reference_variant=reference, lora=lora)
                yield FluxGuardItem.from_parent(self, name=f"{label}/{dtype}/{mode}", target=target)


class FluxGuardItem(pytest.Item):
    """Fuzzes one (variant, dtype, mode); its counts travel on the report for the summary table."""

    def __init__(self, *, target: Target, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target

    def runtest(self) -> None:
        from .fuzz import run_item

        stats = ItemStats()
        try:
            run_item(
                self, self.target, self.config.stash[OPTIONS_KEY], self.config.stash[PIPELINES_KEY], stats
            )
        finally:
            self.user_properties.append(stats.to_property())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, FluxGuardFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"fluxguard {self.name}"
