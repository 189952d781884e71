"""Write a scan's files: report.json, plan.json, a self-contained report.html and headroom.png.

report.json holds only what follows from the model, the arguments and the samples (no time, no
host, no process count), so a scan split across processes writes the same bytes as a scan on
one process. The HTML page needs no script and no network: the chart is inline SVG.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .headroom_chart import png_chart, svg_chart
from .plan import PrecisionPlan
from .scan import HeadroomScan, ModuleHeadroom

REPORT_FILES = ("report.json", "plan.json", "report.html", "headroom.png")
COLUMNS = (
    "module",
    "class",
    "output absmax",
    "output headroom (bits)",
    "input absmax",
    "input headroom (bits)",
    "calls",
    "",
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.at-risk td { color: #c62828; font-weight: 600; }
code, td.name { font-family: monospace; }
"""


def report_json(scan: HeadroomScan) -> str:
    return json.dumps(scan.to_dict(), indent=2, allow_nan=False) + "\n"


def _bits(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else ("zero output" if value > 0 else "non-finite")


def _module_rows(modules: tuple[ModuleHeadroom, ...]) -> str:
    header = "".join(f"<th>{title}</th>" for title in COLUMNS)
    rows = []
    for module in modules:
        numbers = (
            f"{module.absmax:.4g}",
            _bits(module.headroom_bits),
            f"{module.input_absmax:.4g}",
            _bits(module.input_headroom_bits),
            str(module.calls),
        )
        rows.append(
            f'<tr class="{"at-risk" if module.at_risk else "fits"}">'
            f'<td class="name">{html.escape(module.module)}</td><td>{html.escape(module.module_class)}</td>'
            + "".join(f'<td class="number">{number}</td>' for number in numbers)
            + f"<td>{'at risk' if module.at_risk else ''}</td></tr>"
        )
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _plan_section(plan: PrecisionPlan) -> str:
    if not plan.entries:
        return "<p>Nothing is at risk, so the plan is empty.</p>"
    items = "".join(
        f"<li><code>{html.escape(entry.module)}</code> ({html.escape(entry.module_class)}) in float32</li>"
        for entry in plan.entries
    )
    return (
        f"<ul>{items}</ul><p>Apply it with <code>GuardedFluxFillPipeline.from_pretrained(model, "
        "guard_plan=&quot;plan.json&quot;)</code> or <code>fluxguard fill MODEL --plan plan.json</code>.</p>"
    )


def report_html(scan: HeadroomScan, plan: PrecisionPlan) -> str:
    """One page: summary, chart of headroom per block, the plan, every module sorted by headroom."""
    at_risk = scan.at_risk
    summary = (
        f"{len(scan.modules)} modules recorded in float32 over {scan.samples} sample(s); "
        f"headroom against {scan.dtype} (max {scan.dtype_max:g}); margin {scan.margin_bits:g} bit(s); "
        f"<strong>{len(at_risk)} at risk</strong>."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fluxguard headroom: {html.escape(scan.model)}</title>
<style>{_STYLE}</style></head><body>
<h1>Headroom scan of <code>{html.escape(scan.model)}</code></h1>
<p>{summary}</p>
<p>Headroom is log2({scan.dtype} max / largest magnitude), of each module's output and of its
inputs: below 0 it overflows {scan.dtype}; below the margin the module is marked at risk. Each
bar is a block's lowest headroom.</p>
<h2>Headroom per block</h2>
{svg_chart(scan)}
<h2>Precision plan</h2>
{_plan_section(plan)}
<h2>Modules at risk</h2>
{_module_rows(at_risk) if at_risk else "<p>None.</p>"}
<h2>All modules, lowest headroom first</h2>
{_module_rows(scan.modules)}
</body></html>
"""


def write_report(scan: HeadroomScan, plan: PrecisionPlan, folder: Path) -> list[Path]:
    """Write the four files into ``folder`` (created if needed); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in REPORT_FILES]
    paths[0].write_text(report_json(scan), encoding="utf-8")
    plan.save(paths[1])
    paths[2].write_text(report_html(scan, plan), encoding="utf-8")
    png_chart(scan).save(paths[3])
    return paths
