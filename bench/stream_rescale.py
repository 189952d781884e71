"""An overflowing residual stream, two ways: rescaled exactly in float16, or carried in float32.

Run from the repository root:  python bench/stream_rescale.py [--seeds N] [--rounds N] [--json PATH]

For each site of ``guarded_diffusers.testing.RESIDUAL_SITES`` (a massive channel a later block
cancels) and ``LASTING_STREAM_SITES`` (a stream past float16 up to the output norm) a tiny pipeline
is saved and loaded guarded in float16 with ``stream_rescale`` alone, ``residual`` alone and the
default order, and compared with plain float32 on the same inputs:

- PSNR against float32 (minimum over seeds, each recovering from scratch) and bfloat16's;
- the guard's verdict and the relative L2 error it measured on the first incident;
- memory: parameter bytes over the float16 pipeline's, the largest residual-block output (the
  stream) over plain float16's, and the host bytes ``stream_rescale`` keeps to restore weights
  that became float16 subnormals;
- time: the denoiser's minimum time per step with the fix held, and the whole recovering call,
  over plain float16's, from interleaved A B B A rounds, next to a plain-against-plain control.

A last table loads a folder baked on one input (``fluxguard bake``) and calls it with an input the
bake did not see, which drives a baked cut past float16 again: the run-time rescale on top of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import numpy as np
import torch
from PIL import Image
from strategies import add_options, interleaved_ratio, prepared_site

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.baking.run import bake
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.core.stream import residual_blocks
from guarded_diffusers.testing import (
    LASTING_STREAM_SITES,
    RESIDUAL_SITES,
    inject_overflow,
    sample_inputs,
    tiny_flux_fill_pipeline,
)
from guarded_diffusers.testing.triggers import inject_mask_coverage_overflow

ARMS = {"stream_rescale": ["stream_rescale"], "residual": ["residual"], "default order": None}


@dataclasses.dataclass
class Row:
    """One site and arm (``None`` fields where recovery failed)."""

    site: str
    arm: str
    strategies: str | None
    verdict: str | None
    first_error: float | None
    psnr_guarded: float | None
    psnr_bf16: float
    param_ratio: float | None = None
    stream_ratio: float | None = None
    kept_bytes: int | None = None
    step_ratio: float | None = None
    recovering_ratio: float | None = None
    error: str | None = None


@contextmanager
def stepping(pipe: Any) -> Iterator[list[float]]:
    """Seconds of each denoiser call (one per step) inside the block."""
    times: list[float] = []
    starts: list[float] = []
    transformer = pipe.transformer
    handles = [
        transformer.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())),
        transformer.register_forward_hook(lambda *_: times.append(time.perf_counter() - starts.pop())),
    ]
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def step_ratio(plain: Any, pipe: Any, rounds: int) -> float:
    """min denoiser step of ``pipe`` / min step of ``plain``, over A B B A rounds of whole calls."""
    steps: dict[int, list[float]] = {id(plain): [], id(pipe): []}

    def run(each: Any) -> None:
        with stepping(each) as times:
            _common.generate(each)
        steps[id(each)].extend(times)

    for _ in range(rounds):
        for each in (plain, pipe, pipe, plain):
            run(each)
    return min(steps[id(pipe)]) / min(steps[id(plain)])


def largest_stream_bytes(pipe: Any) -> int:
    """The largest residual-block output of one call, in bytes: the stream's activation memory."""
    largest = [0]

    def record(module: Any, args: Any, output: Any) -> None:
        for tensor in output if isinstance(output, tuple) else (output,):
            largest[0] = max(largest[0], tensor.numel() * tensor.element_size())

    handles = [block.register_forward_hook(record) for block in residual_blocks(pipe.transformer)]
    try:
        _common.generate(pipe)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def measure(site: str, arm: str, path: Path, seeds: int, rounds: int, plain: dict[str, Any]) -> Row:
    pipe = GuardedFluxFillPipeline.from_pretrained(str(path), dtype=torch.float16, guard_strategies=ARMS[arm])
    pipe.set_progress_bar_config(disable=True)
    bf16 = min(plain["bf16_psnr"])
    psnrs, verdicts, firsts = [], set(), []
    try:
        for seed in range(seeds):
            pipe.guard.reset()
            output = _common.generate(pipe, seed=seed)
            psnrs.append(psnr(output.images, plain["references"][seed]))
            incidents = output.guard_report.incidents
            verdicts |= {"recovered" if i.recovered else "degraded" for i in incidents}
            firsts.append(math.inf if incidents[0].error is None else incidents[0].error)
            used = ", ".join(f"{i.strategy}" for i in incidents)
    except NonFiniteError as error:
        pipe.guard.reset()
        return Row(site, arm, None, None, None, None, bf16, error=str(error).splitlines()[0])
    fp16 = plain["float16"]
    kept = sum(getattr(fix, "kept_bytes", 0) for fix in pipe.guard.fixes)
    row = Row(
        site,
        arm,
        used,
        "degraded" if "degraded" in verdicts else "recovered",
        max(firsts),
        min(psnrs),
        bf16,
        _common.parameter_bytes(pipe) / _common.parameter_bytes(fp16),
        largest_stream_bytes(pipe) / largest_stream_bytes(fp16),
        kept,
        step_ratio(fp16, pipe, rounds),
    )
    recovering = lambda: (pipe.guard.reset(), _common.generate(pipe))  # noqa: E731
    row.recovering_ratio = interleaved_ratio(lambda: _common.generate(fp16), recovering, rounds)
    pipe.guard.reset()
    return row


# -- a baked folder and an input it did not see ------------------------------------------------

WHITE = Image.fromarray(np.full((32, 32, 3), 255, np.uint8))


def _hole(size: int) -> Image.Image:
    mask = np.full((32, 32), 255, np.uint8)
    mask[:size, :size] = 0
    return Image.fromarray(mask, mode="L")


def baked_rows(workdir: Path) -> list[dict[str, Any]]:
    """A lasting stream and a mask-coverage trigger, baked on a quarter-painted white image; then a
    3x3 (and 2x2) unpainted corner drives the VAE encoder's baked cut past float16 again."""
    pipe = tiny_flux_fill_pipeline(seed=0)
    inject_overflow(pipe, "double_block_massive_channel")
    inject_mask_coverage_overflow(pipe)
    pipe.save_pretrained(workdir / "src")
    calibration = {**sample_inputs(32), "image": WHITE, "num_inference_steps": 2, "max_sequence_length": 32}
    result = bake(pipe, [calibration])
    write_baked(workdir / "src", workdir / "out", result)
    reference = _common.load(workdir / "src", torch.float32)
    rows = []
    for hole in (3, 2):
        unseen = {"image": WHITE, "mask_image": _hole(hole)}
        expected = _common.generate(reference, **unseen).images
        for arm in ("stream_rescale", "default order"):
            guarded = GuardedFluxFillPipeline.from_pretrained(
                str(workdir / "out"), dtype=torch.float16, guard_strategies=ARMS[arm]
            )
            guarded.set_progress_bar_config(disable=True)
            output = _common.generate(guarded, **unseen)
            [incident] = output.guard_report.incidents
            fix = guarded.guard.fixes[0]
            rows.append(
                {
                    "hole": f"{hole}x{hole}",
                    "arm": arm,
                    "baked_k": {c.cut.name: c.k for c in result.scaled},
                    "strategy": incident.strategy,
                    "runtime_k": fix.describe().get("exponent"),
                    "error": incident.error,
                    "verdict": "recovered" if incident.recovered else "degraded",
                    "psnr": psnr(output.images, expected),
                }
            )
    return rows


# -- output ------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| site | arm | fixes | verdict | first error | guarded fp16 | bf16 | params | stream bytes "
        "| kept (host) | denoiser step | recovering call |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(
                f"| {r.site} | {r.arm} | failed: {r.error[:70]} | | | | {r.psnr_bf16:.2f} dB | | | | | |"
            )
            continue
        lines.append(
            f"| {r.site} | {r.arm} | {r.strategies} | {r.verdict} | {_num(r.first_error, '.1e')} "
            f"| {r.psnr_guarded:.2f} dB | {r.psnr_bf16:.2f} dB | {r.param_ratio:.3f} | {r.stream_ratio:.1f}x "
            f"| {r.kept_bytes} B | {r.step_ratio:.2f}x | {r.recovering_ratio:.2f}x |"
        )
    return "\n".join(lines)


def baked_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| unseen input | arm | baked k | fix | run-time k | error | verdict | PSNR vs float32 |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        baked = ", ".join(f"{name.split('.')[0]}: {k}" for name, k in r["baked_k"].items())
        lines.append(
            f"| white image, {r['hole']} unpainted | {r['arm']} | {baked} | {r['strategy']} "
            f"| {r['runtime_k'] if r['runtime_k'] is not None else '-'} | {r['error']:.1e} | {r['verdict']} "
            f"| {r['psnr']:.2f} dB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, rounds=3)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    _common.quiet()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    controls: list[float] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="guarded-stream-rescale-") as workdir:
        for site in [*RESIDUAL_SITES, *LASTING_STREAM_SITES]:
            path, plain, control = prepared_site(workdir, site, args.seeds, args.rounds)
            controls.append(control)
            controls.append(step_ratio(plain["float16"], _common.load(path, torch.float16), args.rounds))
            rows.extend(measure(site, arm, path, args.seeds, args.rounds, plain) for arm in ARMS)
        baked = baked_rows(Path(workdir) / "baked")
    print(markdown_table(rows))
    print()
    print(
        f"PSNR vs plain float32, minimum over {args.seeds} seed(s); first error: the guard's relative "
        "L2 error of the first incident's measured region, largest over seeds; params: parameter bytes "
        "/ the float16 pipeline's; stream bytes: largest residual-block output / plain float16's; kept: "
        "host bytes held to restore subnormal weights; time ratios: minimum guarded / minimum plain "
        f"float16 over {args.rounds} A B B A rounds. Control (plain against plain, call and step): "
        f"{min(controls):.3f}x to {max(controls):.3f}x."
    )
    print()
    print(baked_table(baked))
    print()
    print(f"{_common.machine_summary()}; {time.perf_counter() - start:.0f} s")
    if args.json:
        payload = {
            "machine": _common.machine_summary(),
            "controls": controls,
            "rows": [dataclasses.asdict(r) for r in rows],
            "baked": baked,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
