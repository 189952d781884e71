"""``fluxguard scan``: record headroom, mark modules at risk, write the report and a precision plan.

Under ``accelerate launch`` every process records its share of the samples and only the main
process merges, writes files and prints.
"""

from __future__ import annotations

import argparse
import time

from accelerate import PartialState

from ..demo import quiet
from ..scan.headroom import HeadroomScan
from ..scan.plan import ScanPlan, plan_scan
from ..scan.report import write_report
from ..scan.run import ScanRequest, SizeTooSmall, run_scan
from .inputs import UsageError, device, memory_fraction, output_folder, pipeline_folder

SHOWN_MODULES = 5


def _entry_text(strategy: str, module: str, params: dict) -> str:
    if strategy == "upcast":
        return f"float32 island on {module}"
    if strategy == "residual":
        return f"residual on {module} (exponent {params['exponent']})"
    return f"{strategy} on {module}"


def summary(scan: HeadroomScan, planned: ScanPlan) -> str:
    """A few lines for the terminal: counts, the lowest headroom, stream spans and the plan."""
    lines = [
        f"{scan.samples} sample(s), {len(scan.modules)} modules recorded in float32; "
        f"{len(scan.at_risk)} at risk in {scan.dtype} (headroom under {scan.margin_bits:g} bit)",
        "lowest headroom (bits):",
    ]
    for module in scan.modules[:SHOWN_MODULES]:
        mark = "  AT RISK" if module.at_risk else ""
        side, peak = (
            ("input", module.input_absmax)
            if module.input_headroom_bits < module.headroom_bits
            else ("output", module.absmax)
        )
        lines.append(f"  {module.lowest_bits:7.2f}  {module.module} ({side} absmax {peak:.4g}){mark}")
    for span in scan.spans:
        extent = span.blocks[0] if len(span.blocks) == 1 else f"{span.blocks[0]} .. {span.blocks[-1]}"
        lines.append(
            f"stream span: {extent} (stream absmax {span.absmax:.4g}, {span.headroom_bits:.2f} bits)  AT RISK"
        )
    entries = [_entry_text(fix.entry.strategy, fix.entry.module, fix.entry.params) for fix in planned.fixes]
    lines.append("plan: " + (", ".join(entries) or "nothing to fix"))
    if planned.fixes:
        budget = f" of {planned.budget_bytes}" if planned.budget_bytes is not None else ""
        lines.append(f"plan adds {planned.extra_bytes}{budget} parameter bytes")
    for item in planned.unplanned:
        lines.append(f"not planned: {item.module}: {item.reason}")
    return "\n".join(lines)


def run_scan_command(args: argparse.Namespace) -> int:
    """Check the inputs, scan, and (on the main process) write the files and print the summary."""
    pipeline_folder(args.model)
    request = ScanRequest(
        model=args.model,
        dtype=args.dtype,
        samples=args.samples,
        margin_bits=args.margin,
        max_size=args.max_size,
        max_steps=args.max_steps,
        max_sequence_length=args.max_sequence_length,
        max_guidance=args.max_guidance,
        device=device(args.device),
        max_extra_memory=memory_fraction(args.max_extra_memory),
    )
    folder = output_folder(args.out)
    quiet()
    started = time.perf_counter()
    try:
        scan = run_scan(request)
    except SizeTooSmall as error:
        raise UsageError(str(error)) from None
    if scan is None:
        return 0
    planned = plan_scan(scan)
    paths = write_report(scan, planned, folder)
    print(summary(scan, planned))
    seconds, processes = time.perf_counter() - started, PartialState().num_processes
    print(f"scanned in {seconds:.1f} s on {processes} process(es); wrote {', '.join(map(str, paths))}")
    return 0
