"""SDXL's own answer to a float16 VAE overflow, ``force_upcast``, against the guard in float16.

Run from the repository root:  python bench/sdxl_vae.py [--seeds N] [--budget S] [--threads N]
(the script puts its own folder on ``sys.path`` to import ``_common``).

diffusers' SDXL pipelines decode float16 latents with the whole VAE cast to float32 when the VAE
config says ``force_upcast`` (SDXL's does), and cast it back after: every call, whether or not
anything would overflow. The guard keeps the VAE in float16 and, once a decode overflows, runs only
the located region in float32 from then on. A tiny SDXL with the ``vae_decoder`` injection (one
decoder resnet overflows float16) is saved once and loaded as plain float32 (the reference), plain
bfloat16, and four float16 arms: A plain as shipped (``force_upcast``), B guarded with ``guard(pipe)``
(``force_upcast`` off: the guard replaces it), C plain without ``force_upcast`` (black images, the
cost of float16 itself) and A' a second instance of A, the same-against-same control.

Measured: PSNR against float32 (minimum over seeds); the VAE's parameter and buffer bytes while the
decoder runs and after the call; the decode time, from the end of the last denoising step to the
call's return (the casts of ``force_upcast`` included), and the whole call, in rounds of the
palindrome A B C A' A' C B A, minimum times. The guard's first call, which diagnoses and fixes, is
timed apart. The same fixed region is weighed on the released SDXL VAE's architecture (built on the
meta device, no weights) to show what each answer costs in memory at full size. On a CPU, float16
convolutions are slower than float32 ones, so C and B decode slower than A here; on a GPU the
opposite holds, which these tiny CPU timings cannot show.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn

from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.testing import FAMILIES

FAMILY, SITE = "sdxl", "vae_decoder"
STEPS = 4
LABELS = {
    "A": "force_upcast fp16",
    "B": "guarded fp16",
    "C": "plain fp16, force_upcast off",
    "A'": "force_upcast fp16 (2nd instance)",
}
# The released SDXL VAE's architecture (its config.json), for the full-size memory figures.
SDXL_VAE_CONFIG = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
}


class DecodeWatch:
    """Marks the end of the last denoising step (as the step callback) and the VAE's bytes at decode."""

    def __init__(self, pipe: Any) -> None:
        self.last_step_end = 0.0
        self.vae_bytes = 0
        pipe.vae.decoder.register_forward_pre_hook(self._decoding)
        self._vae = pipe.vae

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.last_step_end = time.perf_counter()
        return {}

    def _decoding(self, module: nn.Module, args: tuple) -> None:
        self.vae_bytes = _common.module_bytes(self._vae)


@dataclasses.dataclass
class Timed:
    """One call: seconds from the last step to the return, the whole call, and what it produced."""

    decode: float
    call: float
    images: np.ndarray
    vae_bytes_decoding: int
    report: Any


def timed_call(pipe: Any, watch: DecodeWatch, seed: int = 0) -> Timed:
    """One call of ``pipe`` with the decode phase and the VAE's bytes while decoding recorded."""
    kwargs = {**FAMILIES[FAMILY].call_kwargs(seed=seed, steps=STEPS), "callback_on_step_end": watch}
    began = time.perf_counter()
    output = pipe(**kwargs)
    ended = time.perf_counter()
    report = getattr(output, "guard_report", None)
    return Timed(ended - watch.last_step_end, ended - began, output.images, watch.vae_bytes, report)


def full_size_bytes(fixed_module: str) -> tuple[int, int]:
    """Float16 bytes of SDXL's released VAE shape and of ``fixed_module`` in it.

    Float32 doubles float16's bytes, so each is also what casting it to float32 adds.
    """
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).to(torch.float16)
    region = vae.get_submodule(fixed_module.removeprefix("vae."))
    return _common.module_bytes(vae), _common.module_bytes(region)


def _megabytes(count: int) -> str:
    """Bytes in MiB, or in KiB below one MiB (the tiny model's VAE)."""
    return f"{count / 2**20:.2f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="input/generator seeds for PSNR (default 3)")
    parser.add_argument("--rounds", type=int, default=30, help="at most this many timed rounds (default 30)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds (default 60)")
    _common.add_threads_option(parser)
    args = parser.parse_args(argv)
    _common.quiet()
    # force_upcast calls diffusers' deprecated upcast_vae(): its notice would repeat every call.
    warnings.filterwarnings("ignore", message=".*upcast_vae.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="guarded-bench-") as workdir:
        injected = FAMILIES[FAMILY].save(workdir, site=SITE)
        load = functools.partial(_common.load_pipeline, workdir)
        reference = load(torch.float32)
        others = {"bf16": load(torch.bfloat16)}
        pipes = {
            "A": load(torch.float16, force_upcast=True),
            "B": load(torch.float16, guarded=True),
            "C": load(torch.float16),
            "A'": load(torch.float16, force_upcast=True),
        }
    vae_at_rest_fp16 = _common.module_bytes(pipes["A"].vae)
    calls = {
        name: functools.partial(timed_call, pipe, DecodeWatch(pipe))
        for name, pipe in {"fp32": reference, **others, **pipes}.items()
    }
    first = calls["B"]()  # the guard diagnoses, fixes and decodes again
    fidelity: dict[str, list[float]] = {name: [] for name in (*others, *pipes)}
    for seed in range(args.seeds):
        expected = calls["fp32"](seed).images
        for name, values in fidelity.items():
            values.append(psnr(calls[name](seed).images, expected))
    arms = {arm: calls[arm] for arm in pipes}
    for call in arms.values():  # warm-up
        call()
    runs, rounds = _common.interleaved_rounds(arms, args.rounds, args.budget)
    elapsed = time.perf_counter() - start

    later_incidents = sum(len(run.report.incidents) for run in runs["B"])
    incident = first.report.incidents[0]
    print(_common.machine_summary())
    print(
        f"tiny SDXL, `{SITE}` injected at `{injected}`, 32x32, {STEPS} steps; {rounds} rounds of "
        f"{' '.join([*pipes, *reversed(pipes)])} after one warm-up call per arm; {elapsed:.0f} s in all"
    )
    print(
        f"guard's first call: incident at `{incident.module}`, fixed `{incident.fixed_module}` by "
        f"{incident.strategy} (recovered: {incident.recovered}); incidents in its {len(runs['B'])} timed "
        f"calls: {later_incidents}"
    )
    print()
    print(f"| arm | PSNR vs fp32, min over {args.seeds} seed(s) (dB) |")
    print("|---|---:|")
    for name, values in fidelity.items():
        print(f"| {name if name in others else f'{name} {LABELS[name]}'} | {min(values):.2f} |")
    print()
    print("| arm | VAE bytes while decoding | VAE bytes after the call | decode min s | call min s |")
    print("|---|---:|---:|---:|---:|")
    for arm, values in runs.items():
        print(
            f"| {arm} {LABELS[arm]} | {_megabytes(values[-1].vae_bytes_decoding)} "
            f"| {_megabytes(_common.module_bytes(pipes[arm].vae))} "
            f"| {min(run.decode for run in values):.4f} | {min(run.call for run in values):.4f} |"
        )
    print(
        f"| B's first call (diagnosis + fix) | {_megabytes(first.vae_bytes_decoding)} | - "
        f"| {first.decode:.4f} | {first.call:.4f} |"
    )
    print()
    for measure in ("decode", "call"):
        best = {arm: min(getattr(run, measure) for run in values) for arm, values in runs.items()}
        control = best["A'"] / best["A"]
        print(
            f"{measure}: guarded/force_upcast B/A (min) {best['B'] / best['A']:.4f}, "
            f"guarded/plain fp16 B/C (min) {best['B'] / best['C']:.4f}, control A'/A (min) {control:.4f}"
        )
    print(f"float16 VAE at rest: {_megabytes(vae_at_rest_fp16)}")
    vae16, region16 = full_size_bytes(incident.fixed_module)
    print(
        f"released SDXL VAE shape: float16 {_megabytes(vae16)}; force_upcast adds {_megabytes(vae16)} "
        f"while decoding; a float32 `{incident.fixed_module}` adds {_megabytes(region16)} "
        f"({region16 / vae16:.1%} of the float16 VAE)"
    )
    identical = all(np.array_equal(run.images, runs["A"][0].images) for run in runs["A'"])
    print(f"force_upcast outputs identical across instances (np.array_equal): {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
