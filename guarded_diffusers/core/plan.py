"""Precision plans: the fixes a guard applied, saved as JSON, applied before the first step next time.

A plan lists, in the order they were made, which module each fix changed, the strategy that
made it and the parameters it needs (``Fix.describe()``), plus the module's class so a plan made
for another model is refused. Plans are plain JSON: nothing is pickled, nothing is executed.

A plan is untrusted input, so reading one is bounded: at most ``MAX_FILE_BYTES`` per file, JSON
nested at most ``MAX_DEPTH`` deep, one fix per module. Every refusal is one ``ValueError`` that
names the plan (its file, or "(in memory)"), the fix (index and module) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import reprlib
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

FORMAT = "guarded-diffusers/precision-plan"
VERSION = 1
# A real plan holds a few fixes of a few hundred bytes each; 1 MiB leaves room for thousands.
MAX_FILE_BYTES = 1 << 20
# A plan needs 7 levels (plan, fixes, fix, params, consumer_shifts, shifts, pair); json's parser
# recurses per level, so deeper input is refused before parsing, not with a RecursionError.
MAX_DEPTH = 16
IN_MEMORY = "(in memory)"

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One fix: ``strategy`` re-applies ``params`` to ``module`` (an instance of ``module_class``)."""

    strategy: str
    module: str
    module_class: str
    params: dict[str, Any]


def plan_error(
    source: str,
    problem: str,
    *,
    index: int | None = None,
    module: str | None = None,
    field: str | None = None,
    misfit: bool = False,
) -> ValueError:
    """The one shape of every refusal: which plan, which fix (index and module), which field, why."""
    where = "" if index is None else f"fix {index}" + (f" ({module})" if module else "")
    if field is not None:
        where += f"{', ' if where else ''}`{field}`"
    head = (
        f"Precision plan {source} does not fit this pipeline"
        if misfit
        else f"Invalid precision plan {source}"
    )
    return ValueError(f"{head}: {where + ': ' if where else ''}{problem.rstrip('.')}.")


def is_real(value: Any) -> bool:
    """A finite JSON number: ``True`` is not one (bool is an int), huge ints are compared exactly."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def check_keys(
    params: Mapping[str, Any], required: Collection[str] = (), optional: Collection[str] = ()
) -> None:
    """``ValueError`` for a missing or unknown parameter: a misspelt key must not be silently ignored."""
    missing = [key for key in required if key not in params]
    unknown = [key for key in params if key not in required and key not in optional]
    if missing or unknown:
        expected = ", ".join(f"`{key}`" for key in [*required, *optional]) or "none"
        found = ", ".join(f"`{reprlib.repr(key)}`" for key in missing or unknown)
        raise ValueError(f"{'missing' if missing else 'unknown'} parameter {found} (expected: {expected}).")


def _too_deep(value: Any) -> bool:
    """Whether nested lists and mappings go deeper than ``MAX_DEPTH``; iterative, so cycles end too."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth > MAX_DEPTH:
                return True
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _text_too_deep(text: str) -> bool:
    """Bracket depth of JSON text outside its strings, counted without parsing it."""
    depth = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _checked_entry(entry: Any, index: int, source: str) -> PlanEntry:
    """``entry`` itself if it is a well-formed fix: non-empty names, JSON parameters."""
    if not isinstance(entry, PlanEntry):
        raise plan_error(source, f"a {type(entry).__name__}, not a PlanEntry", index=index)
    for key in ("strategy", "module", "module_class"):
        if not isinstance(getattr(entry, key), str) or not getattr(entry, key):
            raise plan_error(source, "must be a non-empty string", index=index, field=key)
    module = entry.module
    if not isinstance(entry.params, Mapping) or not all(isinstance(key, str) for key in entry.params):
        raise plan_error(source, "must be an object", index=index, module=module, field="params")
    if _too_deep(entry.params):
        raise plan_error(
            source, f"nested deeper than {MAX_DEPTH} levels", index=index, module=module, field="params"
        )
    try:
        json.dumps(entry.params, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise plan_error(
            source, f"must hold plain JSON values ({error})", index=index, module=module, field="params"
        ) from None
    return entry


def _entry_from_dict(item: Any, index: int, source: str) -> PlanEntry:
    fields = {field.name: field.type for field in dataclasses.fields(PlanEntry)}
    if not isinstance(item, Mapping) or set(item) != set(fields):
        raise plan_error(source, f"fix {index} must have exactly the keys {', '.join(fields)}")
    params = item["params"]
    if not isinstance(params, Mapping):
        raise plan_error(source, "must be an object", index=index, field="params")
    return _checked_entry(
        PlanEntry(item["strategy"], item["module"], item["module_class"], dict(params)), index, source
    )


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """Fixes to apply to a pipeline before its first step; see ``Guard.plan()`` and ``guard_plan=``.

    ``source`` names the plan in errors: the file it was read from, or "(in memory)".
    """

    entries: tuple[PlanEntry, ...] = ()
    source: str = dataclasses.field(default=IN_MEMORY, compare=False)

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
    def from_dict(cls, data: Any, source: str = IN_MEMORY) -> PrecisionPlan:
        if _too_deep(data):
            raise plan_error(source, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise plan_error(source, f'expected a JSON object with "format": "{FORMAT}"')
        if data.get("version") != VERSION:
            version = reprlib.repr(data.get("version"))
            raise plan_error(source, f"version {version} is not supported (this reads {VERSION})")
        fixes = data.get("fixes")
        if not isinstance(fixes, list):
            raise plan_error(source, '"fixes" must be a list')
        plan = cls(tuple(_entry_from_dict(item, index, source) for index, item in enumerate(fixes)), source)
        plan.check()
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrecisionPlan:
        """Read and check a plan file; ``ValueError`` naming the file for anything malformed."""
        source = os.fspath(path)
        try:
            size = os.stat(path).st_size
            raw = b"" if size > MAX_FILE_BYTES else _read_at_most(path, MAX_FILE_BYTES + 1)
        except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
            reason = getattr(error, "strerror", None) or error
            raise ValueError(f"Cannot read precision plan {source}: {reason}.") from None
        if size > MAX_FILE_BYTES or len(raw) > MAX_FILE_BYTES:
            raise plan_error(source, f"the file is larger than the {MAX_FILE_BYTES} bytes a plan may have")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise plan_error(source, f"not UTF-8 text (byte {error.start})") from None
        if _text_too_deep(text):
            raise plan_error(source, f"JSON nested deeper than {MAX_DEPTH} levels")
        try:
            data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except ValueError as error:
            raise plan_error(source, f"not JSON ({error})") from None
        return cls.from_dict(data, source)

    def check(self, known: Collection[str] | None = None) -> None:
        """``ValueError`` for a malformed fix, a module fixed twice, or an unknown strategy if ``known``."""
        if not isinstance(self.entries, tuple | list):
            raise plan_error(
                self.source, f"`entries` must be a tuple of PlanEntry, not {type(self.entries).__name__}"
            )
        first_fix: dict[str, int] = {}
        for index, entry in enumerate(self.entries):
            _checked_entry(entry, index, self.source)
            if entry.module in first_fix:
                raise plan_error(
                    self.source,
                    f"already fixed by fix {first_fix[entry.module]}; a plan holds one fix per module",
                    index=index,
                    module=entry.module,
                    field="module",
                )
            first_fix[entry.module] = index
        for index, entry in enumerate(self.entries):
            if known is not None and entry.strategy not in known:
                raise plan_error(
                    self.source,
                    f"unknown strategy {entry.strategy!r}; known: {', '.join(sorted(known))}. "
                    "Install the plugin that provides it",
                    index=index,
                    module=entry.module,
                    field="strategy",
                )

    def check_strategies(self, known: Collection[str]) -> None:
        """``ValueError`` if an entry names a strategy no plugin registers (or the plan is malformed)."""
        self.check(known)


def _read_at_most(path: str | os.PathLike[str], limit: int) -> bytes:
    """Read up to ``limit`` bytes: a FIFO or a device file reports size 0 and may never end."""
    with open(path, "rb") as file:
        return file.read(limit)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    """JSON numbers such as 1e999 parse to inf in Python; a plan refuses them like NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {reprlib.repr(text)} is out of range")
    return value
