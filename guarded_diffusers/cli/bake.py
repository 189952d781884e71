"""``fluxguard bake SRC OUT``: a float16-safe copy of a pipeline folder, by exact powers of two.

The command checks its paths before loading anything, bakes in float32 (``guarded_diffusers.bake``)
block by block from SRC's files (``baking.streamed``: a 12B transformer never sits in memory),
prints the cuts it scaled, the self-check's figures and what still overflows, and writes OUT only
when the self-check passes and nothing overflows (or ``--allow-remaining``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..core.devices import resolve_device
from ..demo import quiet
from .inputs import UsageError, device, pipeline_folder
from .log import BarStream

if TYPE_CHECKING:
    from ..baking.run import BakeResult

SHOWN = 8


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} dB"


def summary(result: BakeResult) -> str:
    """Lines for the terminal: cuts scaled, checks, subnormals, what remains."""
    lines = []
    for choice in result.scaled[:SHOWN]:
        notes = f" ({'; '.join(choice.notes)})" if choice.notes else ""
        lines.append(
            f"scaled cut {choice.cut.name}: k={choice.k}, peak {choice.cut.peak:.4g} -> "
            f"{choice.cut.peak * 2.0**-choice.k:.4g}, {len(choice.cut.writers)} writers{notes}"
        )
    if len(result.scaled) > SHOWN:
        lines.append(f"... and {len(result.scaled) - SHOWN} more scaled cuts (see fluxguard-bake.json)")
    if not result.scaled:
        lines.append(
            "no cut needs scaling: every scale-invariant tensor fits float16 with 3 bits of headroom"
        )
    for choice in result.breaks:
        lines.append(f"not scaled: {choice.cut.name} needs k={choice.needed} but is {choice.breaks}")
    checks = result.checks
    lines.append(
        f"self-check against the original in float32: baked float32 {_db(checks.baked_float32)}, "
        f"baked float16 {_db(checks.baked_float16)}, original float16 {_db(checks.original_float16)}, "
        f"bfloat16 {_db(checks.original_bfloat16)}"
    )
    for name, value in checks.per_cut_float32.items():
        lines.append(f"  cut {name} alone, float32: {_db(value)}")
    sub = result.subnormals
    if sub["scaled_elements"]:
        lines.append(
            f"scaled weights that are float16 subnormals: {sub['subnormal_after']} "
            f"(before: {sub['subnormal_before']}), flushed to zero: {sub['zero_after']}"
        )
    for item in result.remaining:
        lines.append(
            f"still overflows float16: {item.module} (float32 peak {item.absmax:.4g}): {item.reason}"
        )
    return "\n".join(lines)


def run_bake_command(args: argparse.Namespace) -> int:
    """Check SRC and OUT, bake, report; 0 written, 1 self-check failed or overflows remain."""
    pipeline_folder(args.src)
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    if args.out.resolve().is_relative_to(args.src.resolve()):
        raise UsageError("OUT must be a folder outside SRC")
    where = device(args.device)
    quiet()
    from ..baking.run import BakeError, bake
    from ..baking.samples import scan_calls
    from ..baking.streamed import load_streamed
    from ..baking.write import BakeWriteError, check_source, write_baked

    try:
        check_source(args.src)
    except BakeWriteError as error:
        raise UsageError(str(error)) from None

    started = time.perf_counter()
    out = BarStream(sys.stderr)
    bar = tqdm(desc="bake", unit="step", file=out, dynamic_ncols=True)

    def tick(text: str) -> None:
        bar.set_postfix_str(text, refresh=False)
        bar.update()

    try:
        try:
            streamed = load_streamed(args.src, resolve_device(where))
        except BakeWriteError as error:
            raise UsageError(str(error)) from None
        calls = scan_calls(streamed.pipe, args.samples, args.max_size, args.max_steps)
        try:
            result = bake(streamed.pipe, calls, progress=tick, weights=streamed)
        except BakeError as error:
            out.line(summary(error.result))
            out.line(f"fluxguard bake: error: self-check failed, nothing written: {error}")
            return 1
        except ValueError as error:  # a tied tensor two cuts want scaled differently
            out.line(f"fluxguard bake: error: nothing written: {error}")
            return 1
        out.line(summary(result))
        if result.remaining and not args.allow_remaining:
            out.line(
                "fluxguard bake: error: nothing written: float16 overflows remain that no exact rescale "
                "fixes; pass --allow-remaining (and --plan for the guarded pipeline's precision plan)"
            )
            return 1
        try:
            written = write_baked(
                args.src,
                args.out,
                result,
                variant=args.variant,
                overwrite=args.overwrite,
                plan=args.plan,
                progress=tick,
            )
        except BakeWriteError as error:
            raise UsageError(str(error)) from None
    finally:
        bar.close()
    print(f"baked in {time.perf_counter() - started:.1f} s; wrote {', '.join(map(str, written))}")
    return 0
