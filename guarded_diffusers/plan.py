"""Precision plans: the fixes a guard applied, saved as JSON, applied before the first step next time.

A plan lists, in the order they were made, which module each fix changed, the strategy that
made it and the parameters it needs (``Fix.describe()``), plus the module's class so a plan made
for another model is refused. Plans are plain JSON: nothing is pickled, nothing is executed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

FORMAT = "guarded-diffusers/precision-plan"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One fix: ``strategy`` re-applies ``params`` to ``module`` (an instance of ``module_class``)."""

    strategy: str
    module: str
    module_class: str
    params: dict[str, Any]


def _invalid(source: str, problem: str) -> ValueError:
    return ValueError(f"Invalid precision plan {source}: {problem}.")


def _entry_from_dict(item: Any, index: int, source: str) -> PlanEntry:
    fields = {field.name: field.type for field in dataclasses.fields(PlanEntry)}
    if not isinstance(item, Mapping) or set(item) != set(fields):
        raise _invalid(source, f"fix {index} must have exactly the keys {', '.join(fields)}")
    for key in ("strategy", "module", "module_class"):
        if not isinstance(item[key], str) or not item[key]:
            raise _invalid(source, f"fix {index}: `{key}` must be a non-empty string")
    if not isinstance(item["params"], Mapping):
        raise _invalid(source, f"fix {index}: `params` must be an object")
    return PlanEntry(item["strategy"], item["module"], item["module_class"], dict(item["params"]))


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """Fixes to apply to a pipeline before its first step; see ``Guard.plan()`` and ``guard_plan=``."""

    entries: tuple[PlanEntry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fixes": [dataclasses.asdict(entry) for entry in self.entries],
        }

    def to_json(self) -> str:
        """Strict JSON; a strategy whose parameters are not plain JSON values is named in the error."""
        for entry in self.entries:
            try:
                json.dumps(entry.params, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Strategy {entry.strategy!r} described its fix on {entry.module} with parameters "
                    f"that are not plain JSON ({error}); its `describe()` must return JSON values."
                ) from None
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "(in memory)") -> PrecisionPlan:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise _invalid(source, f'expected a JSON object with "format": "{FORMAT}"')
        if data.get("version") != VERSION:
            raise _invalid(source, f"version {data.get('version')!r} is not supported (this reads {VERSION})")
        fixes = data.get("fixes")
        if not isinstance(fixes, list):
            raise _invalid(source, '"fixes" must be a list')
        return cls(tuple(_entry_from_dict(item, index, source) for index, item in enumerate(fixes)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrecisionPlan:
        """Read and check a plan file; ``ValueError`` naming the file for anything malformed."""
        source = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"Cannot read precision plan {source}: {error.strerror or error}.") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as error:
            raise _invalid(source, f"not JSON ({error})") from None
        return cls.from_dict(data, source)

    def check_strategies(self, known: Collection[str]) -> None:
        """``ValueError`` if an entry names a strategy no plugin registers."""
        unknown = sorted({entry.strategy for entry in self.entries} - set(known))
        if unknown:
            raise ValueError(
                f"The precision plan uses unknown strateg{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}. "
                "Install the plugin that provides it."
            )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
