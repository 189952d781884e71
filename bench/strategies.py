"""Trade-offs of the recovery strategies: fidelity, memory and time, per injection site.

Run from the repository root:  python bench/strategies.py [--seeds N] [--rounds N] [--json PATH]

For each site of ``guarded_diffusers.testing.INJECTION_SITES`` a tiny pipeline is saved, then
loaded guarded in float16 with one strategy at a time (``guard_strategies=[name]``) and compared
with plain float32 (the reference), plain bfloat16 and plain float16 on the same inputs:

- PSNR against float32, minimum over seeds (each seed recovers from scratch: ``guard.reset()``);
- the guard's own verdict: the relative L2 error it measured on the fixed region against float32
  (largest over seeds) and whether that made the incident recovered (within 2**-8) or degraded;
- parameter memory after recovery over the float16 pipeline's;
- time of the recovering call (diagnosis, fix, recompute) and of later calls (fix held) over a
  plain float16 call, from interleaved A B B A rounds and minimum times, next to a plain-against-
  plain control so the noise floor shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import torch

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.testing import INJECTION_SITES, save_tiny_pipeline

# The strategies that fix a located module (``guidance`` declines at every injection site).
SITE_STRATEGIES = ("upcast", "rescale", "clamp")


@dataclasses.dataclass
class Row:
    """One site and strategy: fidelity, memory and time ratios (``None`` where recovery failed)."""

    site: str
    strategy: str
    fixed_module: str | None
    verdict: str | None
    relative_error: float | None
    psnr_guarded_fp16: float | None
    psnr_bf16: float
    memory_ratio: float | None
    recovering_call_ratio: float | None
    later_call_ratio: float | None
    error: str | None = None


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_ratio(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> float:
    """min time of ``b`` / min time of ``a`` over ``rounds`` of A B B A."""
    times_a, times_b = [], []
    for _ in range(rounds):
        times_a.append(_seconds(a))
        times_b.append(_seconds(b))
        times_b.append(_seconds(b))
        times_a.append(_seconds(a))
    return min(times_b) / min(times_a)


def _recovering_call(pipe: GuardedFluxFillPipeline) -> Callable[[], Any]:
    """A guarded call that recovers from scratch; the reset is timed too, and costs microseconds."""

    def call() -> Any:
        pipe.guard.reset()
        return _common.generate(pipe)

    return call


def measure(
    site: str, strategy: str, path: Path, seeds: int, rounds: int, plain: dict[str, Any], budget: float
) -> Row:
    pipe = GuardedFluxFillPipeline.from_pretrained(
        str(path), dtype=torch.float16, guard_strategies=[strategy], guard_max_extra_memory=budget
    )
    pipe.set_progress_bar_config(disable=True)
    fp16_bytes = _common.parameter_bytes(plain["float16"])
    psnrs, bf16, errors, verdicts = [], [], [], set()
    fixed = None
    try:
        for seed in range(seeds):
            pipe.guard.reset()
            output = _common.generate(pipe, seed=seed)
            psnrs.append(psnr(output.images, plain["references"][seed]))
            bf16.append(plain["bf16_psnr"][seed])
            incidents = output.guard_report.incidents
            fixed = ", ".join(dict.fromkeys(i.fixed_module for i in incidents))
            errors += [math.inf if i.error is None else i.error for i in incidents]
            verdicts |= {"recovered" if i.recovered else "degraded" for i in incidents}
    except NonFiniteError as error:
        pipe.guard.reset()
        return Row(
            site,
            strategy,
            None,
            None,
            None,
            None,
            min(plain["bf16_psnr"]),
            None,
            None,
            None,
            str(error).splitlines()[0],
        )
    memory = _common.parameter_bytes(pipe) / fp16_bytes
    baseline = lambda: _common.generate(plain["float16"])  # noqa: E731
    recovering = interleaved_ratio(baseline, _recovering_call(pipe), rounds)
    later = interleaved_ratio(baseline, lambda: _common.generate(pipe), rounds)
    pipe.guard.reset()
    verdict = "degraded" if "degraded" in verdicts else "recovered"
    return Row(site, strategy, fixed, verdict, max(errors), min(psnrs), min(bf16), memory, recovering, later)


def plain_pipelines(path: Path, seeds: int) -> dict[str, Any]:
    """Plain float16 (the time baseline), float32 reference images and bfloat16's PSNR per seed."""
    reference = _common.load(path, torch.float32)
    bf16 = _common.load(path, torch.bfloat16)
    references = [_common.generate(reference, seed=seed).images for seed in range(seeds)]
    return {
        "float16": _common.load(path, torch.float16),
        "references": references,
        "bf16_psnr": [
            psnr(_common.generate(bf16, seed=seed).images, references[seed]) for seed in range(seeds)
        ],
    }


def prepared_site(workdir: str, site: str, seeds: int, rounds: int) -> tuple[Path, dict[str, Any], float]:
    """A tiny pipeline saved with ``site`` injected, its plain pipelines (``plain_pipelines``) and the
    plain-against-plain float16 time ratio, the noise floor of every ratio measured on it."""
    path = Path(workdir) / site
    save_tiny_pipeline(path, site=site)
    plain = plain_pipelines(path, seeds)
    baseline = lambda: _common.generate(plain["float16"])  # noqa: E731
    return path, plain, interleaved_ratio(baseline, baseline, rounds)


def add_options(parser: argparse.ArgumentParser, rounds: int) -> None:
    """``--seeds``, ``--rounds`` (default ``rounds``) and ``--threads`` (default 1: steadier timing)."""
    parser.add_argument("--seeds", type=int, default=3, help="input/generator seeds for PSNR (default 3)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"A B B A rounds (default {rounds})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timing)")


def _cell(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "failed" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| site | strategy | fixed module | guard's verdict | error | guarded fp16 | bf16 | mem ratio "
        "| time, recovering call | time, later calls |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        error = "-" if row.relative_error is None else f"{row.relative_error:.1e}"
        lines.append(
            f"| {row.site} | {row.strategy} | {f'`{row.fixed_module}`' if row.fixed_module else '-'} "
            f"| {row.verdict or 'failed'} | {error} "
            f"| {_cell(row.psnr_guarded_fp16, suffix=' dB')} | {_cell(row.psnr_bf16, suffix=' dB')} "
            f"| {_cell(row.memory_ratio, 3)} | {_cell(row.recovering_call_ratio)}x "
            f"| {_cell(row.later_call_ratio)}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, rounds=5)
    parser.add_argument(
        "--max-extra-memory",
        type=float,
        default=0.1,
        help="guard_max_extra_memory (default 0.1: room for upcast at every site; the tiny model's "
        "single block is 7.4 %% of the pipeline, over the guard's default 5 %%)",
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    _common.quiet()
    torch.set_num_threads(args.threads)
    rows, controls = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="guarded-strategies-") as workdir:
        for site in INJECTION_SITES:
            path, plain, control = prepared_site(workdir, site, args.seeds, args.rounds)
            controls.append(control)
            rows.extend(
                measure(site, name, path, args.seeds, args.rounds, plain, args.max_extra_memory)
                for name in SITE_STRATEGIES
            )
    print(markdown_table(rows))
    print()
    print(
        f"PSNR vs plain float32, minimum over {args.seeds} seed(s); error: the guard's relative L2 "
        f"error of the fixed region against float32, largest over seeds; guard_max_extra_memory="
        f"{args.max_extra_memory}. Time ratios: minimum guarded time / "
        f"minimum plain float16 time over {args.rounds} A B B A rounds. Control (plain against plain): "
        f"{min(controls):.3f}x to {max(controls):.3f}x."
    )
    print(f"{_common.machine_summary()}; {time.perf_counter() - start:.0f} s")
    if args.json:
        payload = {
            "machine": _common.machine_summary(),
            "controls": controls,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(row.error is None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
