"""fluxguard bake on the tiny models: what an exact power-of-two rescale buys in float16, per site.

Run from the repository root:  python bench/bake.py [--seeds N] [--json PATH]

For each injection site a tiny Flux Fill pipeline is saved, baked in float32 on one calibration
call (seed 0), written with ``write_baked``, and loaded back by plain diffusers' FluxFillPipeline.
Every figure is a PSNR against the original's float32 images on held-out calls (seeds 1..N: other
images, noise and 4 steps instead of 2), the worst seed counting:

- plain float16 and bfloat16 of the original;
- the written folder in float16 (the user's path) and in float32 (the function must not move);
- the k chosen per scaled cut, and scaled weights that became float16 subnormals.

Sites with an overflow inside a layer are baked with what can be baked; the remaining modules are
listed. A second table shows the eps trade-off on one site: the headroom target decides k.

``--full-width`` instead runs the streamed bake end to end on a Flux Fill pipeline at Flux's width
(3072, 24 heads of 128, T5 width 4096) with a few random blocks (``_full_width``): every pass's time
per block, peak RSS against the largest block + 2 GiB, and the projection to Flux's 57 blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import torch
from _full_width import full_width

from guarded_diffusers.baking.calibrate import run_images
from guarded_diffusers.baking.run import BakeError, bake
from guarded_diffusers.baking.verify import worst_psnr
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.testing import sample_inputs, save_tiny_pipeline

SITES = (
    None,
    "single_block_proj_out",
    "single_block_residual",
    "double_block_ff_residual",
    # held out: added after the bake was built, which was not changed for them
    "double_block_massive_channel",
    "double_block_stream_growth",
    "single_block_stream_growth",
    "vae_decoder",
    "vae_encoder",
    "double_block_ff",
    "t5_ff",
)
EPS_SITE = "double_block_ff_residual"
EPS_TARGETS = (2.0**15, 2.0**13, 2.0**11)


def call(seed: int, steps: int) -> dict[str, Any]:
    return {
        **sample_inputs(32, seed=seed),
        "num_inference_steps": steps,
        "max_sequence_length": 32,
        "seed": seed,
    }


def measure(site: str | None, seeds: int, folder: Path, headroom_peak: float = 2.0**13) -> dict[str, Any]:
    src, out = folder / "src", folder / "out"
    save_tiny_pipeline(src, site)
    held_out = [call(seed, 4) for seed in range(1, seeds + 1)]
    reference = run_images(_common.load(src, torch.float32), held_out)
    pipe = _common.load(src, torch.float32)
    try:
        result = bake(pipe, [call(0, 2)], headroom_peak=headroom_peak)
        refused = None
    except BakeError as error:
        result, refused = error.result, str(error)
    row: dict[str, Any] = {
        "site": site or "clean",
        "k": ", ".join(f"{choice.cut.name.split('.')[0]}:{choice.k}" for choice in result.scaled) or "-",
        "subnormal": result.subnormals["subnormal_after"] - result.subnormals["subnormal_before"],
        "remaining": [item.module for item in result.remaining],
        "refused": refused,
    }
    for name, dtype in (("plain_fp16", torch.float16), ("bf16", torch.bfloat16)):
        row[name] = worst_psnr(run_images(_common.load(src, dtype), held_out), reference)
    if refused is None:
        write_baked(src, out, result)
        row["baked_fp16"] = worst_psnr(run_images(_common.load(out, torch.float16), held_out), reference)
        row["baked_fp32"] = worst_psnr(run_images(_common.load(out, torch.float32), held_out), reference)
    return row


def _db(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="held-out calls (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--full-width", action="store_true", help="the streamed bake at Flux's width instead")
    parser.add_argument("--tokens", type=int, nargs=2, default=(256, 64), metavar=("IMAGE", "TEXT"))
    parser.add_argument("--blocks", type=int, nargs=2, default=(2, 2), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the --full-width call")
    _common.add_threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _common.quiet()
    if args.full_width:
        with tempfile.TemporaryDirectory() as tmp:
            full_width(*args.tokens, *args.blocks, args.steps, Path(tmp))
        return
    rows, eps_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index, site in enumerate(SITES):
            rows.append(measure(site, args.seeds, Path(tmp) / f"site{index}"))
        for index, target in enumerate(EPS_TARGETS):
            row = measure(EPS_SITE, args.seeds, Path(tmp) / f"eps{index}", headroom_peak=target)
            eps_rows.append({**row, "headroom_peak": target})
    print(_common.machine_summary())
    print(
        "| case | plain fp16 | bf16 | baked, plain fp16 | baked fp32 vs original | k | new fp16 subnormals |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        extra = f" (remaining: {', '.join(row['remaining'])})" if row["remaining"] else ""
        print(
            f"| {row['site']}{extra} | {_db(row['plain_fp16'])} | {_db(row['bf16'])} | "
            f"{_db(row.get('baked_fp16'))} | {_db(row.get('baked_fp32'))} | {row['k']} | {row['subnormal']} |"
        )
    print(f"\neps trade-off on {EPS_SITE}:")
    print("| headroom target | k | baked fp32 vs original | baked, plain fp16 | self-check |")
    print("|---|---|---|---|---|")
    for row in eps_rows:
        verdict = "refused: " + row["refused"] if row["refused"] else ""
        print(
            f"| 2^{math.log2(row['headroom_peak']):g} | {row['k']} | {_db(row.get('baked_fp32'))} | "
            f"{_db(row.get('baked_fp16'))} | {verdict} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"sites": rows, "eps": eps_rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
