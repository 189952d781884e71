"""Fidelity and cost of recovery at every injection site of every pipeline family.

Run from the repository root:  python bench/fidelity.py [--seeds N] [--families NAME ...] [--json PATH]
(the script puts its own folder on ``sys.path`` to import ``_common``).

For each family of ``guarded_diffusers.testing.FAMILIES`` (Flux Fill, Flux, Flux Kontext, SD3, SDXL,
SD 1.5) and each of its sites, plus a clean model as control and, for Flux Fill, the clean model at
guidance 100 and 1000 (diffusers computes guidance x 1000 in float16 there), a tiny pipeline is saved
and loaded four ways with ``DiffusionPipeline.from_pretrained``: plain float32 (the reference), plain
bfloat16, plain float16 and float16 guarded in place with ``guard(pipe)``, default settings. float16
runs every module in float16: SDXL's ``force_upcast`` (the whole VAE in float32 to decode) is off,
``bench/sdxl_vae.py`` weighs it against the guard. Per input seed it measures PSNR against float32,
the denoiser forwards the guard adds over plain float16 per incident, and the parameter memory after
recovery relative to the float16 pipeline. Per family, on the clean model, it times guarded against
plain float16 calls in interleaved rounds next to a plain-against-plain control.

The exit status is 1 when a gate fails, so this is also a check: where there are incidents, guarded
float16 at least the required margin above bfloat16, the first incident located at the injected
module and recovered (measured within 2**-8 of float32 by the guard itself), at most 2 extra denoiser
forwards per incident (plus one for each fix the guard tried and did not keep, and stream_rescale's own
trace and float32 reference of the component) and parameter memory
at most 1.05x (the guard's default budget); on the clean model, guarded float16 images equal plain
float16's bit for bit. The required margin is 20 dB, capped at the family's own float16 margin on its
clean model less 3 dB: no recovery is closer to float32 than float16 without overflow, which keeps
only 3 more mantissa bits than bfloat16 (18 dB). The time overhead verdict is printed, not enforced.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import numpy as np
import torch

from guarded_diffusers import NonFiniteError
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.testing import FAMILIES

MAX_EXTRA_FORWARDS_PER_INCIDENT = 2.0
MAX_MEMORY_RATIO = 1.05
MIN_MARGIN_DB = 20.0
# How far below its clean float16 margin a recovered family may land (a factor 2 in squared error).
CEILING_SLACK_DB = 3.0
MAX_OVERHEAD = 0.03
STEPS = 4
CLEAN = "clean (control)"
CONTROL = "A'"  # the second plain instance in the happy-path timing
# Cases beyond the injection sites, per family: (name, call overrides) on the clean model.
EXTRA_CASES = {
    "flux_fill": (("guidance 100", {"guidance_scale": 100.0}), ("guidance 1000", {"guidance_scale": 1000.0})),
}


@dataclasses.dataclass
class SeedResult:
    """One input seed at one site: the three PSNRs, forward counts, incidents and memory."""

    seed: int
    psnr_guarded_fp16: float
    psnr_bf16: float
    psnr_fp16: float
    plain_forwards: int
    guarded_forwards_started: int
    guarded_forwards_completed: int
    memory_ratio: float
    extra_bytes: int
    incidents: list[dict[str, Any]]
    identical_to_fp16: bool
    error: str | None = None

    @property
    def margin(self) -> float:
        """Guarded float16 minus plain bfloat16, in dB (0 when both match float32 exactly)."""
        if self.psnr_guarded_fp16 == self.psnr_bf16:
            return 0.0
        return self.psnr_guarded_fp16 - self.psnr_bf16

    @property
    def clean_margin(self) -> float:
        """Plain float16 minus plain bfloat16, in dB: what float16 itself gains where it does not overflow."""
        return self.psnr_fp16 - self.psnr_bf16

    @property
    def extra_forwards(self) -> int:
        """Denoiser forwards started by the guarded call beyond those of the plain float16 call."""
        return self.guarded_forwards_started - self.plain_forwards

    @property
    def aborted_forwards(self) -> int:
        """Guarded denoiser forwards that started but never returned: the diagnostic re-runs."""
        return self.guarded_forwards_started - self.guarded_forwards_completed

    @property
    def rerun_forwards(self) -> int:
        """Extra guarded denoiser forwards that returned: the recomputes."""
        return self.extra_forwards - self.aborted_forwards

    @property
    def incidents_count(self) -> int:
        return len(self.incidents)

    @property
    def degraded_count(self) -> int:
        return sum(1 for incident in self.incidents if incident["degraded"])

    @property
    def extra_forwards_per_incident(self) -> float:
        if not self.incidents:
            return 0.0 if self.extra_forwards == 0 else math.inf
        return self.extra_forwards / len(self.incidents)

    @property
    def retried_forwards(self) -> int:
        """Forwards the guard owes to fixes it tried and did not keep: each recompute of a fix that
        measured degraded (or unmeasured), plus the re-run that found a fix had not held."""
        costs = {"degraded": 1, "unmeasured": 1, "not held": 2}
        return sum(costs.get(a["outcome"], 0) for incident in self.incidents for a in incident["attempts"])

    @property
    def search_forwards(self) -> int:
        """Forwards ``stream_rescale`` runs itself: one float32 reference of the whole component per
        attempt it made (the fix changes every writer of the stream), and one trace of the component
        per call (cached for the later attempts)."""
        made = sum(
            1
            for incident in self.incidents
            for a in incident["attempts"]
            if a["strategy"] == "stream_rescale" and a["outcome"] != "declined"
        )
        return made + (made > 0)

    def to_dict(self) -> dict[str, Any]:
        """The measured fields plus the derived margin and extra forwards."""
        return {
            **dataclasses.asdict(self),
            "margin_db": self.margin,
            "extra_forwards": self.extra_forwards,
            "aborted_forwards": self.aborted_forwards,
            "rerun_forwards": self.rerun_forwards,
            "extra_forwards_per_incident": self.extra_forwards_per_incident,
        }


@dataclasses.dataclass
class SiteResult:
    """All seeds of one site, with the module the injection targeted (``None`` for the control)."""

    family: str
    site: str
    injected_module: str | None
    seeds: list[SeedResult]
    required_margin: float = MIN_MARGIN_DB

    def worst(self, key: str, highest: bool = True) -> float:
        """The highest (or lowest) value of a ``SeedResult`` field over the seeds."""
        values = [getattr(seed, key) for seed in self.seeds]
        return max(values) if highest else min(values)

    def failures(self) -> list[str]:
        """Every gate this site fails, as readable lines."""
        problems = []
        for seed in self.seeds:
            where = f"{self.family} {self.site} seed {seed.seed}"
            if seed.error:
                problems.append(f"{where}: guarded call raised: {seed.error.splitlines()[0]}")
            if self.site == CLEAN and not seed.identical_to_fp16:
                problems.append(f"{where}: guarded fp16 images differ from plain fp16 on the clean model")
            least = self.required_margin if seed.incidents else 0.0
            if not seed.margin >= least:
                problems.append(
                    f"{where}: guarded fp16 {seed.psnr_guarded_fp16:.2f} dB < bf16 {seed.psnr_bf16:.2f} dB "
                    f"+ {least:.2f}"
                )
            if seed.incidents:
                first = seed.incidents[0]
                if not first["recovered"]:
                    problems.append(f"{where}: incident at {first['module']} not recovered ({first})")
                if self.injected_module and first["module"] != self.injected_module:
                    problems.append(f"{where}: located {first['module']}, injected {self.injected_module}")
            elif self.site != CLEAN:
                problems.append(f"{where}: no incident reported")
            allowed = MAX_EXTRA_FORWARDS_PER_INCIDENT * len(seed.incidents)
            allowed += seed.retried_forwards + seed.search_forwards
            if not seed.extra_forwards <= allowed:
                problems.append(
                    f"{where}: {seed.extra_forwards} extra denoiser forwards for "
                    f"{len(seed.incidents)} incident(s)"
                )
            if not seed.memory_ratio <= MAX_MEMORY_RATIO:
                problems.append(
                    f"{where}: parameter memory ratio {seed.memory_ratio:.3f} > {MAX_MEMORY_RATIO}"
                )
        return problems


@dataclasses.dataclass
class Overhead:
    """Happy-path call times of one family's clean model: plain (A), guarded (B), plain again (A')."""

    family: str
    rounds: int
    times: dict[str, list[dict[str, float]]]

    def best(self, arm: str, clock: str) -> float:
        """Minimum seconds of ``arm`` on ``clock``: its least-disturbed call."""
        return min(run[clock] for run in self.times[arm])

    def ratio(self, arm: str, clock: str) -> float:
        """Minimum time of ``arm`` over plain float16's."""
        return self.best(arm, clock) / self.best("A", clock)

    def within_noise(self, clock: str) -> bool:
        """Guarded is at most 3 % slower than plain, or than the control says this machine can resolve."""
        return self.ratio("B", clock) - 1 <= max(MAX_OVERHEAD, abs(self.ratio(CONTROL, clock) - 1))


def _denoiser(pipe: Any) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


def _call(pipe: Any, family: str, seed: int, overrides: dict[str, Any]) -> Any:
    return pipe(**{**FAMILIES[family].call_kwargs(seed=seed, steps=STEPS), **overrides})


def measure_site(
    family: str, name: str, site: str | None, seeds: int, workdir: Path, overrides: dict[str, Any]
) -> SiteResult:
    """Save the site's tiny model, load it four ways and measure every seed."""
    path = workdir / f"{family}-{name.replace(' ', '-')}"
    injected = FAMILIES[family].save(path, site=site)
    reference = _common.load_pipeline(path, torch.float32)
    bf16 = _common.load_pipeline(path, torch.bfloat16)
    fp16 = _common.load_pipeline(path, torch.float16)
    guarded = _common.load_pipeline(path, torch.float16, guarded=True)
    base_bytes = _common.parameter_bytes(fp16)
    results = []
    for seed in range(seeds):
        expected = _call(reference, family, seed, overrides).images
        plain_counter, guarded_counter = _common.ForwardCounter(), _common.ForwardCounter()
        bf16_images = _call(bf16, family, seed, overrides).images
        with plain_counter.watching(_denoiser(fp16)):
            fp16_images = _call(fp16, family, seed, overrides).images
        guarded.guard.reset()  # every seed recovers from scratch instead of reusing earlier fixes
        error = None
        with guarded_counter.watching(_denoiser(guarded)):
            try:
                output = _call(guarded, family, seed, overrides)
                images, report = output.images, output.guard_report
            except NonFiniteError as raised:
                images, report, error = np.full_like(expected, np.nan), raised.report, str(raised)
        results.append(
            SeedResult(
                seed=seed,
                psnr_guarded_fp16=psnr(images, expected),
                psnr_bf16=psnr(bf16_images, expected),
                psnr_fp16=psnr(fp16_images, expected),
                plain_forwards=plain_counter.started,
                guarded_forwards_started=guarded_counter.started,
                guarded_forwards_completed=guarded_counter.completed,
                memory_ratio=_common.parameter_bytes(guarded) / base_bytes,
                extra_bytes=report.extra_bytes,
                incidents=[incident.to_dict() for incident in report.incidents],
                identical_to_fp16=bool(np.array_equal(images, fp16_images)),
                error=error,
            )
        )
    return SiteResult(family, name, injected, results)


def measure_overhead(family: str, workdir: Path, budget: float) -> Overhead:
    """Time guarded against plain float16 calls on the family's clean model, with a plain control."""
    path = workdir / f"{family}-overhead"
    FAMILIES[family].save(path)
    pipes = {
        "A": _common.load_pipeline(path, torch.float16),
        "B": _common.load_pipeline(path, torch.float16, guarded=True),
        CONTROL: _common.load_pipeline(path, torch.float16),
    }
    arms = {
        arm: functools.partial(_common.clocked, functools.partial(_call, pipe, family, 0, {}))
        for arm, pipe in pipes.items()
    }
    for call in arms.values():  # warm-up
        call()
    times, rounds = _common.interleaved_rounds(arms, rounds=1000, budget=budget)
    return Overhead(family, rounds, times)


def measure_family(
    family: str, seeds: int, workdir: Path, overhead_budget: float
) -> tuple[list[SiteResult], Overhead | None]:
    """Every case of ``family``; the clean control first, since it sets the margin the others need."""
    clean = measure_site(family, CLEAN, None, seeds, workdir, {})
    ceiling = min(seed.clean_margin for seed in clean.seeds)
    required = min(MIN_MARGIN_DB, ceiling - CEILING_SLACK_DB)
    cases = [
        *((site, site, {}) for site in FAMILIES[family].sites),
        *((name, None, overrides) for name, overrides in EXTRA_CASES.get(family, ())),
    ]
    results = [clean]
    for name, site, overrides in cases:
        results.append(measure_site(family, name, site, seeds, workdir, overrides))
        gc.collect()
    for result in results:
        result.required_margin = required
    overhead = measure_overhead(family, workdir, overhead_budget) if overhead_budget > 0 else None
    return results, overhead


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.2f}"


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(value for value in values if value is not None))


def markdown_table(results: list[SiteResult], seeds: int) -> str:
    """One family's results as a markdown table; PSNRs and the margin are the minimum over seeds."""
    lines = [
        f"PSNR vs plain float32 in dB, minimum over {seeds} seed(s); margin = min over seeds of "
        f"(guarded fp16 - bf16); required where there are incidents: {results[0].required_margin:.2f} dB.",
        "",
        "| site | overflowing module | fixed region | guarded fp16 | bf16 | fp16 | margin | incidents "
        "(degraded) | extra fwd (diag+rerun) / incidents | mem ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        incidents = [incident for seed in result.seeds for incident in seed.incidents]
        located = _unique([incident["module"] for incident in incidents])
        fixed = _unique([incident["fixed_module"] for incident in incidents])
        module = ", ".join(f"`{name}`" for name in located) or "-"
        if result.injected_module and result.injected_module not in located:
            module += f" (injected: `{result.injected_module}`)"
        extra = ", ".join(
            dict.fromkeys(
                f"{seed.extra_forwards} ({seed.aborted_forwards}+{seed.rerun_forwards})"
                f" / {seed.incidents_count}"
                for seed in result.seeds
            )
        )
        lines.append(
            f"| {result.site} | {module} | {', '.join(f'`{name}`' for name in fixed) or '-'} "
            f"| {_db(result.worst('psnr_guarded_fp16', highest=False))} "
            f"| {_db(result.worst('psnr_bf16', highest=False))} "
            f"| {_db(result.worst('psnr_fp16', highest=False))} "
            f"| {_db(result.worst('margin', highest=False))} "
            f"| {int(result.worst('incidents_count'))} ({max(seed.degraded_count for seed in result.seeds)}) "
            f"| {extra} "
            f"| {result.worst('memory_ratio'):.3f} |"
        )
    return "\n".join(lines)


def overhead_table(overheads: list[Overhead]) -> str:
    """Happy-path time per family and clock as a markdown table: minimum times and their ratios."""
    lines = [
        "| family | rounds | clock | plain fp16 min s | guarded fp16 min s | B-A (min) ms | B/A (min) "
        "| control A'/A (min) | within noise |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for overhead in overheads:
        for clock in _common.CLOCKS:
            plain, guarded = overhead.best("A", clock), overhead.best("B", clock)
            lines.append(
                f"| {overhead.family} | {overhead.rounds} | {clock} | {plain:.4f} | {guarded:.4f} "
                f"| {(guarded - plain) * 1000:.1f} | {overhead.ratio('B', clock):.4f} "
                f"| {overhead.ratio(CONTROL, clock):.4f} "
                f"| {'yes' if overhead.within_noise(clock) else 'NO'} |"
            )
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """JSON without NaN/Infinity literals: non-finite floats become the strings 'inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="input/generator seeds per site (default 3)")
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="default: all of them"
    )
    parser.add_argument(
        "--overhead-budget",
        type=float,
        default=20.0,
        help="seconds of interleaved timing per family on its clean model (default 20; 0 skips it)",
    )
    parser.add_argument("--json", type=Path, help="write the raw per-seed results here")
    args = parser.parse_args(argv)
    _common.quiet()
    start = time.perf_counter()
    results: dict[str, list[SiteResult]] = {}
    overheads = []
    with tempfile.TemporaryDirectory(prefix="guarded-bench-") as workdir:
        for family in args.families:
            results[family], overhead = measure_family(
                family, args.seeds, Path(workdir), args.overhead_budget
            )
            overheads += [overhead] if overhead else []
    elapsed = time.perf_counter() - start
    failures = [problem for rows in results.values() for result in rows for problem in result.failures()]
    for family, rows in results.items():
        print(f"### {family}\n")
        print(markdown_table(rows, args.seeds))
        print()
    print(
        "extra fwd: denoiser (transformer or UNet) forwards started by the guarded fp16 call minus those of "
        "the plain fp16 call on the same inputs; diag = started but never returned (the diagnostic re-run "
        "stops at the first non-finite module), rerun = the rest (recompute); distinct values over seeds."
    )
    print(
        "mem ratio: parameter+buffer bytes of every module component after the guarded call / the fp16 "
        "pipeline's before it."
    )
    if overheads:
        print()
        print(
            f"Happy path, clean model, fp16, {STEPS} steps: A plain, B guarded, A' plain again, in rounds of "
            "A B A' A' B A; within noise = B/A - 1 <= max(3 %, |A'/A - 1|) (printed, not enforced)."
        )
        print()
        print(overhead_table(overheads))
    print(f"{_common.machine_summary()}; {elapsed:.0f} s")
    if args.json:
        payload = {
            "machine": _common.machine_summary(),
            "seeds": args.seeds,
            "gates": {
                "min_margin_db": MIN_MARGIN_DB,
                "ceiling_slack_db": CEILING_SLACK_DB,
                "max_extra_forwards_per_incident": MAX_EXTRA_FORWARDS_PER_INCIDENT,
                "max_memory_ratio": MAX_MEMORY_RATIO,
            },
            "failures": failures,
            "results": [
                {
                    "family": result.family,
                    "site": result.site,
                    "injected_module": result.injected_module,
                    "required_margin_db": result.required_margin,
                    "seeds": [seed.to_dict() for seed in result.seeds],
                }
                for rows in results.values()
                for result in rows
            ],
            "overhead": [dataclasses.asdict(overhead) for overhead in overheads],
        }
        args.json.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print(
        f"PASS: guarded fp16 >= bf16 + min({MIN_MARGIN_DB:g} dB, clean fp16 margin - "
        f"{CEILING_SLACK_DB:g} dB) wherever there were incidents, the first incident located and "
        f"recovered, <= "
        f"{MAX_EXTRA_FORWARDS_PER_INCIDENT:g} extra denoiser forwards per incident, parameter memory ratio "
        f"<= {MAX_MEMORY_RATIO}, clean guarded fp16 == plain fp16 bit for bit"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
