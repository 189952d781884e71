"""Headroom per block, laid out once and drawn twice: as inline SVG for the HTML report and as a PNG.

A block is a numbered layer (``transformer.single_transformer_blocks.3``, ``vae.decoder.up_blocks.0``)
or, for modules outside any numbered layer, the component's direct child (``transformer.x_embedder``).
A block's headroom is its lowest module's, so one bar tells whether anything inside is at risk.
The rows of a stream span (consecutive blocks whose residual stream is at risk) are shaded, and a
black tick marks the headroom of the stream each of them passes on.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re

from PIL import Image, ImageDraw

from ..demo import caption_font
from .headroom import COMPONENTS, HeadroomScan

BAR_HEIGHT = 16
ROW_HEIGHT = 22
TOP = 30
BOTTOM = 40
PLOT_WIDTH = 560
GAP = 10
RIGHT = 70
AT_RISK = "#c62828"
SAFE = "#2e7d8f"
SPAN = "#fde0e0"
TICK_OVERHANG = 3
SVG_CHAR_WIDTH = 7.2  # 12 px monospace


@dataclasses.dataclass(frozen=True)
class Bar:
    block: str
    headroom_bits: float
    at_risk: bool
    stream_bits: float | None = None  # the stream's headroom, for a residual-stream block
    in_span: bool = False

    @property
    def value_text(self) -> str:
        return f"{self.headroom_bits:+.2f}" if math.isfinite(self.headroom_bits) else "zero output"


def block_of(module: str) -> str:
    """The numbered layer holding ``module``, else the component's child (or the component itself)."""
    parts = module.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: position + 1])
    return ".".join(parts[:2])


def _natural_key(name: str) -> tuple:
    component = name.split(".")[0]
    rank = COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)
    return (rank, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def block_bars(scan: HeadroomScan) -> list[Bar]:
    """One bar per block, in component order then natural name order."""
    streams = {block.block: block.headroom_bits for block in scan.stream}
    spans = {block for span in scan.spans for block in span.blocks}
    lowest: dict[str, Bar] = {}
    for module in scan.modules:  # sorted by lowest headroom, so a block's first module is its lowest
        block = block_of(module.module)
        if block not in lowest:
            lowest[block] = Bar(block, module.lowest_bits, module.at_risk, streams.get(block), block in spans)
    return [lowest[block] for block in sorted(lowest, key=_natural_key)]


def caption(scan: HeadroomScan) -> str:
    text = f"headroom in bits: log2({scan.dtype} max / absmax)"
    return text + ("; shaded: stream span; tick: stream" if scan.spans else "")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything goes; ``label_width`` depends on the renderer's font."""

    bars: list[Bar]
    margin_bits: float
    label_width: float

    @property
    def low(self) -> float:
        finite = [bar.headroom_bits for bar in self.bars if math.isfinite(bar.headroom_bits)]
        return math.floor(min([-1.0, *finite]))

    @property
    def high(self) -> float:
        finite = [bar.headroom_bits for bar in self.bars if math.isfinite(bar.headroom_bits)]
        return math.ceil(max([self.margin_bits + 1, *finite]))

    @property
    def plot_left(self) -> float:
        return GAP + self.label_width + GAP

    @property
    def width(self) -> int:
        return math.ceil(self.plot_left + PLOT_WIDTH + RIGHT)

    @property
    def height(self) -> int:
        return TOP + ROW_HEIGHT * len(self.bars) + BOTTOM

    def x(self, bits: float) -> float:
        clipped = min(max(bits, self.low), self.high)
        return self.plot_left + PLOT_WIDTH * (clipped - self.low) / (self.high - self.low)

    def row_top(self, index: int) -> float:
        return TOP + ROW_HEIGHT * index + (ROW_HEIGHT - BAR_HEIGHT) / 2

    def ticks(self) -> list[int]:
        step = max(1, math.ceil((self.high - self.low) / 10))
        return list(range(int(self.low), int(self.high) + 1, step))

    def guides(self, dtype: str) -> list[tuple[float, str, str]]:
        """Vertical lines: where the dtype overflows (labelled on its left) and the margin (on its right)."""
        return [(0.0, f"{dtype} max", "end"), (self.margin_bits, f"margin {self.margin_bits:g} bit", "start")]


def svg_chart(scan: HeadroomScan) -> str:
    """A self-contained ``<svg>`` element: no script, no external font or stylesheet."""
    bars = block_bars(scan)
    layout = Layout(bars, scan.margin_bits, SVG_CHAR_WIDTH * max((len(bar.block) for bar in bars), default=0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{layout.width}" height="{layout.height}" '
        'font-family="monospace" font-size="12" role="img" aria-label="headroom per block">'
    ]
    for tick in layout.ticks():
        x = layout.x(tick)
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{layout.height - BOTTOM}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{layout.height - BOTTOM + 16}" text-anchor="middle">{tick}</text>'
        )
    for index, bar in enumerate(bars):
        if bar.in_span:
            parts.append(
                f'<rect x="{layout.plot_left:.1f}" y="{TOP + ROW_HEIGHT * index}" width="{PLOT_WIDTH}" '
                f'height="{ROW_HEIGHT}" fill="{SPAN}">'
                f"<title>{html.escape(bar.block)}: stream span</title></rect>"
            )
    for index, bar in enumerate(bars):
        start, end = sorted((layout.x(0.0), layout.x(bar.headroom_bits)))
        top = layout.row_top(index)
        colour = AT_RISK if bar.at_risk else SAFE
        parts.append(
            f'<text x="{layout.plot_left - GAP:.1f}" y="{top + BAR_HEIGHT - 4:.1f}" text-anchor="end">'
            f"{html.escape(bar.block)}</text>"
        )
        parts.append(
            f'<rect x="{start:.1f}" y="{top:.1f}" width="{max(end - start, 1):.1f}" height="{BAR_HEIGHT}" '
            f'fill="{colour}"><title>{html.escape(bar.block)}: {bar.value_text} bits</title></rect>'
        )
        parts.append(f'<text x="{end + 4:.1f}" y="{top + BAR_HEIGHT - 4:.1f}">{bar.value_text}</text>')
        if bar.in_span and bar.stream_bits is not None and math.isfinite(bar.stream_bits):
            x = layout.x(bar.stream_bits)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top - TICK_OVERHANG:.1f}" x2="{x:.1f}" '
                f'y2="{top + BAR_HEIGHT + TICK_OVERHANG:.1f}" stroke="#000" stroke-width="2">'
                f"<title>{html.escape(bar.block)}: stream {bar.stream_bits:+.2f} bits</title></line>"
            )
    for bits, label, anchor in layout.guides(scan.dtype):
        x = layout.x(bits)
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP - 16}" x2="{x:.1f}" y2="{layout.height - BOTTOM}" '
            'stroke="#000" stroke-dasharray="4 3"/>'
        )
        shift = -3 if anchor == "end" else 3
        parts.append(
            f'<text x="{x + shift:.1f}" y="{TOP - 8}" text-anchor="{anchor}">{html.escape(label)}</text>'
        )
    parts.append(
        f'<text x="{layout.plot_left + PLOT_WIDTH / 2:.1f}" y="{layout.height - 2}" text-anchor="middle">'
        f"{html.escape(caption(scan))}</text></svg>"
    )
    return "\n".join(parts)


def png_chart(scan: HeadroomScan) -> Image.Image:
    """The same chart drawn with Pillow, for viewers and documents that do not show SVG."""
    bars = block_bars(scan)
    font = caption_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    layout = Layout(
        bars, scan.margin_bits, max((measure.textlength(bar.block, font=font) for bar in bars), default=0)
    )
    image = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(image)
    for index, bar in enumerate(bars):
        if bar.in_span:
            row = TOP + ROW_HEIGHT * index
            draw.rectangle(
                [(layout.plot_left, row), (layout.plot_left + PLOT_WIDTH, row + ROW_HEIGHT)], fill=SPAN
            )
    for tick in layout.ticks():
        x = layout.x(tick)
        draw.line([(x, TOP - 4), (x, layout.height - BOTTOM)], fill="#dddddd")
        draw.text((x, layout.height - BOTTOM + 10), str(tick), fill="black", font=font, anchor="mm")
    for index, bar in enumerate(bars):
        start, end = sorted((layout.x(0.0), layout.x(bar.headroom_bits)))
        top = layout.row_top(index)
        middle = top + BAR_HEIGHT / 2
        draw.text((layout.plot_left - GAP, middle), bar.block, fill="black", font=font, anchor="rm")
        draw.rectangle(
            [(start, top), (max(end, start + 1), top + BAR_HEIGHT)], fill=AT_RISK if bar.at_risk else SAFE
        )
        draw.text((end + 4, middle), bar.value_text, fill="black", font=font, anchor="lm")
        if bar.in_span and bar.stream_bits is not None and math.isfinite(bar.stream_bits):
            x = layout.x(bar.stream_bits)
            draw.line(
                [(x, top - TICK_OVERHANG), (x, top + BAR_HEIGHT + TICK_OVERHANG)], fill="black", width=2
            )
    for bits, label, anchor in layout.guides(scan.dtype):
        x = layout.x(bits)
        for y in range(TOP - 16, layout.height - BOTTOM, 7):
            draw.line([(x, y), (x, min(y + 4, layout.height - BOTTOM))], fill="black")
        shift, side = (-3, "rs") if anchor == "end" else (3, "ls")
        draw.text((x + shift, TOP - 6), label, fill="black", font=font, anchor=side)
    draw.text(
        (layout.plot_left + PLOT_WIDTH / 2, layout.height - 8),
        caption(scan),
        fill="black",
        font=font,
        anchor="mm",
    )
    return image
