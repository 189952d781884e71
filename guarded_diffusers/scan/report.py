"""Write a scan's files: report.json, plan.json, a self-contained report.html and headroom.png.

report.json holds only what follows from the model, the arguments and the samples (no time, no
host, no process count), so a scan split across processes writes the same bytes as a scan on
one process. The HTML page needs no script and no network: the chart is inline SVG.

report.json's ``plan`` section says why each plan entry was chosen (``covers``, ``extra_bytes``,
``reason``) and lists the at-risk modules no entry fixes within the budget (``unplanned``).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .chart import png_chart, svg_chart
from .headroom import HeadroomScan, ModuleHeadroom
from .plan import ScanPlan

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

# Tables fit the page (1200 px and narrower): long module and class names wrap, after a dot where
# possible (``_breakable``), anywhere else if a single part is still too long.
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; max-width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: left; }
td { overflow-wrap: anywhere; }
td.number { text-align: right; font-variant-numeric: tabular-nums; overflow-wrap: normal; }
tr.at-risk td { color: #c62828; font-weight: 600; }
tr.in-span td { background: #fde0e0; }
code, td.name { font-family: monospace; }
"""


def report_json(scan: HeadroomScan, planned: ScanPlan) -> str:
    return json.dumps({**scan.to_dict(), "plan": planned.to_dict()}, indent=2, allow_nan=False) + "\n"


def _breakable(name: str) -> str:
    """``name`` escaped for HTML, with a line-break opportunity after every dot."""
    return html.escape(name).replace(".", ".<wbr>")


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
            f'<td class="name">{_breakable(module.module)}</td><td>{html.escape(module.module_class)}</td>'
            + "".join(f'<td class="number">{number}</td>' for number in numbers)
            + f"<td>{'at risk' if module.at_risk else ''}</td></tr>"
        )
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _stream_rows(scan: HeadroomScan) -> str:
    spans = {block for span in scan.spans for block in span.blocks}
    header = "".join(
        f"<th>{title}</th>"
        for title in ("block", "stream", "class", "stream absmax", "headroom (bits)", "calls", "")
    )
    rows = []
    for block in scan.stream:
        marks = ("in a stream span" if block.block in spans else "") + (
            f"; past {scan.dtype}'s clipping band" if block.saturated else ""
        )
        rows.append(
            f'<tr class="{"at-risk in-span" if block.block in spans else "fits"}">'
            f'<td class="name">{_breakable(block.block)}</td>'
            f'<td class="name">{_breakable(block.owner)}</td>'
            f"<td>{html.escape(block.module_class)}</td>"
            f'<td class="number">{block.absmax:.4g}</td><td class="number">{_bits(block.headroom_bits)}</td>'
            f'<td class="number">{block.calls}</td><td>{html.escape(marks)}</td></tr>'
        )
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _span_text(span_blocks: tuple[str, ...]) -> str:
    extent = span_blocks[0] if len(span_blocks) == 1 else f"{span_blocks[0]} .. {span_blocks[-1]}"
    return (
        f"<code>{html.escape(extent)}</code> ({len(span_blocks)} block{'s' if len(span_blocks) > 1 else ''})"
    )


def _stream_section(scan: HeadroomScan) -> str:
    if not scan.stream:
        return "<p>No residual-stream block ran.</p>"
    limit = f"{scan.dtype} max - 1000" if scan.dtype == "float16" else f"{scan.dtype}'s clipping band"
    intro = (
        "<p>Each block's output as it passes the residual stream on (the hidden states only: T5's "
        "position bias is left out). A <strong>stream span</strong> is a run of consecutive blocks "
        "whose stream is under the margin: the stream itself carries out-of-range values (massive "
        f"activations), which diffusers clips at {html.escape(scan.dtype)}'s maximum and the guard "
        f"counts as saturated from {html.escape(limit)}. No module below the component fits there, so "
        "the plan fixes such a span with <code>residual</code> on the layer that produces the values: "
        "the stream travels in float32 from it.</p>"
    )
    if scan.spans:
        items = "".join(
            f"<li>{_span_text(span.blocks)} in <code>{html.escape(span.owner)}</code>: "
            f"stream absmax {span.absmax:.4g}, {_bits(span.headroom_bits)} bits</li>"
            for span in scan.spans
        )
        spans = f"<p><strong>{len(scan.spans)} stream span(s)</strong>:</p><ul>{items}</ul>"
    else:
        spans = "<p>No stream span: every block's stream fits with the margin.</p>"
    return intro + spans + _stream_rows(scan)


def _plan_section(planned: ScanPlan) -> str:
    unplanned = ""
    if planned.unplanned:
        items = "".join(
            f"<li><code>{html.escape(item.module)}</code>: {html.escape(item.reason)}</li>"
            for item in planned.unplanned
        )
        unplanned = (
            "<p><strong>Not planned</strong> (the guard still recovers these at run time, with the "
            f"strategies it is given):</p><ul>{items}</ul>"
        )
    if not planned.fixes:
        nothing = "<p>Nothing is at risk, so the plan is empty.</p>" if not planned.unplanned else ""
        return nothing + unplanned
    items = "".join(
        f"<li><code>{html.escape(fix.entry.module)}</code> ({html.escape(fix.entry.module_class)}): "
        f"<strong>{html.escape(fix.entry.strategy)}</strong>, adds {fix.extra_bytes} bytes. "
        f"{html.escape(fix.reason[:1].upper() + fix.reason[1:])}.</li>"
        for fix in planned.fixes
    )
    budget = (
        f" of the {planned.budget_bytes} bytes the memory budget allows"
        if planned.budget_bytes is not None
        else ""
    )
    return (
        f"<ul>{items}</ul><p>The plan adds {planned.extra_bytes} parameter bytes{budget}.</p>{unplanned}"
        "<p>Apply it with <code>GuardedFluxFillPipeline.from_pretrained(model, "
        "guard_plan=&quot;plan.json&quot;)</code> or <code>fluxguard fill MODEL --plan plan.json</code>.</p>"
    )


def report_html(scan: HeadroomScan, planned: ScanPlan) -> str:
    """One page: summary, chart of headroom per block, the plan, every module sorted by headroom."""
    at_risk = scan.at_risk
    summary = (
        f"{len(scan.modules)} modules recorded in float32 over {scan.samples} sample(s); "
        f"headroom against {scan.dtype} (max {scan.dtype_max:g}); margin {scan.margin_bits:g} bit(s); "
        f"<strong>{len(at_risk)} at risk</strong>; "
        f"<strong>{len(scan.spans)} stream span(s)</strong>."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fluxguard headroom: {html.escape(scan.model)}</title>
<style>{_STYLE}</style></head><body>
<h1>Headroom scan of <code>{html.escape(scan.model)}</code></h1>
<p>{summary}</p>
<p>Headroom is log2({scan.dtype} max / largest magnitude), of each module's output and of its
inputs: below 0 it overflows {scan.dtype}; below the margin the module is marked at risk. Each
bar is a block's lowest headroom; shaded rows are stream spans, blocks whose residual stream is at
risk, with a black tick at the stream's own headroom.</p>
<h2>Headroom per block</h2>
{svg_chart(scan)}
<h2>Precision plan</h2>
{_plan_section(planned)}
<h2>Residual stream</h2>
{_stream_section(scan)}
<h2>Modules at risk</h2>
{_module_rows(at_risk) if at_risk else "<p>None.</p>"}
<h2>All modules, lowest headroom first</h2>
{_module_rows(scan.modules)}
</body></html>
"""


def write_report(scan: HeadroomScan, planned: ScanPlan, folder: Path) -> list[Path]:
    """Write the four files into ``folder`` (created if needed); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in REPORT_FILES]
    paths[0].write_text(report_json(scan, planned), encoding="utf-8")
    planned.plan.save(paths[1])
    paths[2].write_text(report_html(scan, planned), encoding="utf-8")
    png_chart(scan).save(paths[3])
    return paths
