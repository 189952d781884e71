"""Fidelity and cost of recovery at every injection site, against plain float32/bfloat16/float16.

Run from the repository root:  python bench/fidelity.py [--seeds N] [--json PATH]
(the script puts its own folder on ``sys.path`` to import ``_common``).

For each site of ``guarded_diffusers.testing.INJECTION_SITES`` and ``RESIDUAL_SITES``, plus a clean
model as control and
the clean model at guidance 100 and 1000 (diffusers computes guidance x 1000 in float16 there), a
tiny pipeline is saved and loaded four ways: plain float32 (the reference), plain bfloat16, plain
float16 and guarded float16 with default settings. Per input seed it measures PSNR against
float32, the transformer forwards the guard adds over plain float16 per incident, and the parameter
memory after recovery relative to the float16 pipeline. The exit status is 1 when a gate fails, so
this is also a check: where there are incidents, guarded float16 must be at least 20 dB above
bfloat16, the first incident located at the injected module and recovered (measured within 2**-8
of float32 by the guard itself), at most 2 extra transformer forwards per incident (plus one for
each fix the guard tried and did not keep) and
parameter memory at most 1.05x (the guard's default budget); on the clean model, guarded float16 is
no worse than bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from guarded_diffusers.testing import INJECTION_SITES, RESIDUAL_SITES, save_tiny_pipeline

MAX_EXTRA_FORWARDS_PER_INCIDENT = 2.0
MAX_MEMORY_RATIO = 1.05
MIN_MARGIN_DB = 20.0
CLEAN = "clean (control)"
# Cases beyond the injection sites: (name, site, call overrides).
GUIDANCE_CASES = (
    ("guidance 100", None, {"guidance_scale": 100.0}),
    ("guidance 1000", None, {"guidance_scale": 1000.0}),
)


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
    error: str | None = None

    @property
    def margin(self) -> float:
        """Guarded float16 minus plain bfloat16, in dB (0 when both match float32 exactly)."""
        if self.psnr_guarded_fp16 == self.psnr_bf16:
            return 0.0
        return self.psnr_guarded_fp16 - self.psnr_bf16

    @property
    def extra_forwards(self) -> int:
        """Transformer forwards started by the guarded call beyond those of the plain float16 call."""
        return self.guarded_forwards_started - self.plain_forwards

    @property
    def aborted_forwards(self) -> int:
        """Guarded transformer forwards that started but never returned: the diagnostic re-runs."""
        return self.guarded_forwards_started - self.guarded_forwards_completed

    @property
    def rerun_forwards(self) -> int:
        """Extra guarded transformer forwards that returned: the recomputes."""
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

    site: str
    injected_module: str | None
    seeds: list[SeedResult]

    def worst(self, key: str, highest: bool = True) -> float:
        """The highest (or lowest) value of a ``SeedResult`` field over the seeds."""
        values = [getattr(seed, key) for seed in self.seeds]
        return max(values) if highest else min(values)

    def failures(self) -> list[str]:
        """Every gate this site fails, as readable lines."""
        problems = []
        for seed in self.seeds:
            where = f"{self.site} seed {seed.seed}"
            if seed.error:
                problems.append(f"{where}: guarded call raised: {seed.error.splitlines()[0]}")
            least = MIN_MARGIN_DB if seed.incidents else 0.0
            if not seed.margin >= least:
                problems.append(
                    f"{where}: guarded fp16 {seed.psnr_guarded_fp16:.2f} dB < bf16 {seed.psnr_bf16:.2f} dB "
                    f"+ {least:g}"
                )
            if seed.incidents:
                first = seed.incidents[0]
                if not first["recovered"]:
                    problems.append(f"{where}: incident at {first['module']} not recovered ({first})")
                if self.injected_module and first["module"] != self.injected_module:
                    problems.append(f"{where}: located {first['module']}, injected {self.injected_module}")
            elif self.site != CLEAN:
                problems.append(f"{where}: no incident reported")
            allowed = MAX_EXTRA_FORWARDS_PER_INCIDENT * len(seed.incidents) + seed.retried_forwards
            if not seed.extra_forwards <= allowed:
                problems.append(
                    f"{where}: {seed.extra_forwards} extra transformer forwards for "
                    f"{len(seed.incidents)} incident(s)"
                )
            if not seed.memory_ratio <= MAX_MEMORY_RATIO:
                problems.append(
                    f"{where}: parameter memory ratio {seed.memory_ratio:.3f} > {MAX_MEMORY_RATIO}"
                )
        return problems


def _plain_images(
    pipe: Any, seed: int, overrides: dict[str, Any], counter: _common.ForwardCounter | None = None
) -> np.ndarray:
    """Images of one plain call, counting its transformer forwards when ``counter`` is given."""
    if counter is None:
        return _common.generate(pipe, seed=seed, **overrides).images
    with counter.watching(pipe.transformer):
        return _common.generate(pipe, seed=seed, **overrides).images


def measure_site(
    name: str, site: str | None, seeds: int, workdir: Path, overrides: dict[str, Any] | None = None
) -> SiteResult:
    """Save the site's tiny model, load it four ways and measure every seed."""
    overrides = overrides or {}
    path = workdir / name.replace(" ", "-")
    injected = save_tiny_pipeline(path, site=site)
    reference = _common.load(path, torch.float32)
    bf16 = _common.load(path, torch.bfloat16)
    fp16 = _common.load(path, torch.float16)
    guarded = _common.load(path, torch.float16, guarded=True)
    base_bytes = _common.parameter_bytes(fp16)
    results = []
    for seed in range(seeds):
        expected = _plain_images(reference, seed, overrides)
        plain_counter, guarded_counter = _common.ForwardCounter(), _common.ForwardCounter()
        bf16_images = _plain_images(bf16, seed, overrides)
        fp16_images = _plain_images(fp16, seed, overrides, plain_counter)
        guarded.guard.reset()  # every seed recovers from scratch instead of reusing earlier fixes
        error = None
        with guarded_counter.watching(guarded.transformer):
            try:
                output = _common.generate(guarded, seed=seed, **overrides)
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
                error=error,
            )
        )
    return SiteResult(name, injected, results)


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.2f}"


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(value for value in values if value is not None))


def markdown_table(results: list[SiteResult], seeds: int) -> str:
    """The results as a markdown table; PSNRs and the margin are the minimum over seeds."""
    lines = [
        f"PSNR vs plain float32 in dB, minimum over {seeds} seed(s); margin = min over seeds of "
        "(guarded fp16 - bf16).",
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
    parser.add_argument("--json", type=Path, help="write the raw per-seed results here")
    args = parser.parse_args(argv)
    _common.quiet()
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="guarded-bench-") as workdir:
        cases = [
            (CLEAN, None, {}),
            *((site, site, {}) for site in (*INJECTION_SITES, *RESIDUAL_SITES)),
            *GUIDANCE_CASES,
        ]
        for name, site, overrides in cases:
            results.append(measure_site(name, site, args.seeds, Path(workdir), overrides))
            gc.collect()
    elapsed = time.perf_counter() - start
    failures = [problem for result in results for problem in result.failures()]
    print(markdown_table(results, args.seeds))
    print()
    print(
        "extra fwd: transformer forwards started by the guarded fp16 call minus those of the plain fp16 "
        "call on the same inputs; diag = started but never returned (the diagnostic re-run stops at the "
        "first non-finite module), rerun = the rest (recompute); distinct values over seeds."
    )
    print(
        "mem ratio: parameter+buffer bytes of the 4 components after the guarded call / the fp16 "
        "pipeline's before it."
    )
    print(f"{_common.machine_summary()}; {elapsed:.0f} s")
    if args.json:
        payload = {
            "machine": _common.machine_summary(),
            "seeds": args.seeds,
            "gates": {
                "min_margin_db": MIN_MARGIN_DB,
                "max_extra_forwards_per_incident": MAX_EXTRA_FORWARDS_PER_INCIDENT,
                "max_memory_ratio": MAX_MEMORY_RATIO,
            },
            "failures": failures,
            "results": [
                {
                    "site": result.site,
                    "injected_module": result.injected_module,
                    "seeds": [seed.to_dict() for seed in result.seeds],
                }
                for result in results
            ],
        }
        args.json.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print(
        f"PASS: guarded fp16 >= bf16 + {MIN_MARGIN_DB:g} dB wherever there were incidents, the first "
        f"incident located and recovered, <= {MAX_EXTRA_FORWARDS_PER_INCIDENT:g} extra transformer "
        f"forwards per incident, parameter memory ratio <= {MAX_MEMORY_RATIO}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
