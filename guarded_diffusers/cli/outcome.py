"""What fill and generate do with a loaded pipeline: run it, write the image, the table and the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.devices import resolve_device
from ..core.plan import PrecisionPlan
from ..core.report import GuardReport, NonFiniteError
from ..demo import quiet
from .inputs import UsageError, device, in_command_terms, memory_fraction, precision_plan, strategy_names
from .log import BarStream, guard_lines


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    """The guard's options of a run, checked: a plan, strategy names and the memory budget."""

    plan: PrecisionPlan | None
    strategies: list[str] | None
    budget: float


def guard_settings(args: argparse.Namespace) -> GuardSettings:
    """Check the guard's options and the device, then quiet the libraries: all before any model loads."""
    plan = precision_plan(args.plan) if args.plan is not None else None
    settings = GuardSettings(plan, strategy_names(args.strategies), memory_fraction(args.max_extra_memory))
    device(args.device)
    quiet()
    return settings


@contextlib.contextmanager
def loading(model: Path) -> Iterator[None]:
    """A model that cannot load is one line naming it, not a traceback."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load {model}: {str(error).splitlines()[0]}") from None


TABLE_COLUMNS = ("stage", "step", "module", "strategy", "fixed module", "error", "recovered")


def incident_table(report: GuardReport) -> str:
    """The report's incidents as aligned columns; ``no incidents`` when there are none."""
    if not report.incidents:
        return "no incidents"
    rows = [
        (
            incident.stage,
            "-" if incident.step is None else str(incident.step),
            incident.module or "-",
            incident.strategy or "-",
            incident.fixed_module or "-",
            "-" if incident.error is None else f"{incident.error:.1e}",
            "yes" if incident.recovered else "degraded" if incident.degraded else "no",
        )
        for incident in report.incidents
    ]
    widths = [max(len(row[column]) for row in [TABLE_COLUMNS, *rows]) for column in range(len(TABLE_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [TABLE_COLUMNS, *rows]
    )


def write_report(report: GuardReport, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.to_json(indent=2) + "\n", encoding="utf-8")


def run_and_write(
    pipe: Any, call: dict[str, Any], args: argparse.Namespace, output: Path, command: str
) -> int:
    """Run the guarded ``pipe`` on ``call`` with a progress bar; write the image; 1 if the guard gave up."""
    stderr = BarStream(sys.stderr)
    pipe.to(resolve_device(args.device))
    pipe.set_progress_bar_config(disable=False, desc=command, file=stderr)
    try:
        with guard_lines(stderr, command):
            result = pipe(**call)
    except NonFiniteError as error:
        print(incident_table(error.report))
        write_report(error.report, args.report)
        reason = in_command_terms(str(error).splitlines()[0])
        stderr.line(f"fluxguard {command}: the guard could not recover, no image written: {reason}")
        return 1
    except ValueError as error:  # the pipeline's own check of an input the options fed
        raise UsageError(str(error).splitlines()[0]) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(output)
    print(incident_table(result.guard_report))
    write_report(result.guard_report, args.report)
    print(f"wrote {output}" + (f" and {args.report}" if args.report is not None else ""))
    return 0
