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

``--full-width`` instead runs block by block at Flux's width (3072, 24 heads of 128, T5 width
4096): random weights for a few double and single blocks are saved to safetensors by a child
process, the transformer is built on the meta device with only its non-block weights loaded, and
each block reads its float32 weights from the file just before its forward
(``baking.blockwise.streamed_blocks``). It reports each block's time plain and traced, peak RSS
against the largest block + 2 GiB, the time of the streamed write with the stream cut scaled, and
the projection to Flux's 19 double and 38 single blocks.
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

from guarded_diffusers.baking.calibrate import run_images, tracing
from guarded_diffusers.baking.cuts import CutFinder
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


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


FLUX_WIDTH = {"attention_head_dim": 128, "num_attention_heads": 24, "guidance_embeds": True}


def _save_random_transformer(path: str, double: int, single: int) -> None:
    """In a child process (its memory is not the bake's): random full-width weights to one file."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_WIDTH)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)


def full_width(image_tokens: int, text_tokens: int, double: int, single: int, folder: Path) -> None:
    """Block by block at Flux's width: blocks streamed from the file, traced; then the write streamed."""
    import multiprocessing
    import time
    import types

    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from guarded_diffusers.baking.apply import scaling_for
    from guarded_diffusers.baking.blockwise import streamed_blocks
    from guarded_diffusers.baking.choose import Choice
    from guarded_diffusers.baking.tensorfile import read_header, read_tensor, tensors_of
    from guarded_diffusers.baking.write import stream_file

    weights = folder / "transformer.safetensors"
    child = multiprocessing.get_context("spawn").Process(
        target=_save_random_transformer, args=(str(weights), double, single)
    )
    child.start()
    child.join()
    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_WIDTH).eval()
    with open(weights, "rb") as file:  # only the non-block weights stay in memory
        header, start = read_header(file)
        outer = {
            key: read_tensor(file, entry, start)
            for key, entry in tensors_of(header).items()
            if "transformer_blocks." not in key
        }
    model.load_state_dict(outer, strict=False, assign=True)
    del outer
    blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
    parameters = {kind: sum(p.numel() for p in block.parameters()) for kind, block in blocks.items()}
    inputs = {
        "hidden_states": torch.randn(1, image_tokens, 64),
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096),
        "pooled_projections": torch.randn(1, 768),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(image_tokens, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    seconds: dict[str, dict[str, list[float]]] = {"plain": {}, "traced": {}}
    started: list[float] = []
    handles = []
    mode = ["plain"]
    for items in (model.transformer_blocks, model.single_transformer_blocks):
        for block in items:  # registered first: the clock includes reading the block's weights
            handles.append(block.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())))
    finder = CutFinder()
    with torch.no_grad(), streamed_blocks(model, [weights]):
        for kind, items in (
            ("double", model.transformer_blocks),
            ("single", model.single_transformer_blocks),
        ):
            for block in items:
                handles.append(
                    block.register_forward_hook(
                        lambda *_, kind=kind: (
                            seconds[mode[0]].setdefault(kind, []).append(time.perf_counter() - started.pop())
                        )
                    )
                )
        model(**inputs)
        mode[0] = "traced"
        with tracing({"transformer": model}, finder):
            model(**inputs)
    for handle in handles:
        handle.remove()
    calibrated_rss = _rss_gib()
    cuts, layers = finder.cuts()
    stream = next(cut for cut in cuts if "transformer.norm_out.norm" in cut.readers)
    scaling = scaling_for(types.SimpleNamespace(transformer=model), [Choice(stream, 1, 1)], layers)
    clock = time.perf_counter()
    stream_file([weights], folder / "baked.safetensors", scaling.exponents["transformer"])
    write_seconds = time.perf_counter() - clock
    largest = max(parameters.values()) * 4 / 2**30
    print(_common.machine_summary())
    print(
        f"synthetic Flux transformer, width 3072, {double} double + {single} single blocks streamed from "
        f"safetensors, {image_tokens} image + {text_tokens} text tokens, float32"
    )
    print("| block | parameters | forward (weights read per block) | traced | trace overhead |")
    print("|---|---|---|---|---|")
    per_block = {}
    for kind in blocks:
        plain, traced = min(seconds["plain"][kind]), min(seconds["traced"][kind])
        per_block[kind] = traced
        print(
            f"| {kind} | {parameters[kind] / 1e6:.0f} M ({parameters[kind] * 4 / 2**30:.2f} GiB fp32) | "
            f"{plain:.2f} s | {traced:.2f} s | {traced / plain:.2f}x |"
        )
    projected = 19 * per_block["double"] + 38 * per_block["single"]
    total = (19 * parameters["double"] + 38 * parameters["single"]) * 4 / 2**30
    print(
        f"peak RSS after calibration {calibrated_rss:.2f} GiB, after the streamed write {_rss_gib():.2f} GiB "
        f"(largest block {largest:.2f} GiB; budget largest block + 2 GiB = {largest + 2:.2f} GiB); "
        f"stream cut: {len(stream.writers)} writers; write of {weights.stat().st_size / 2**30:.2f} GiB "
        f"with the stream scaled: {write_seconds:.1f} s"
    )
    print(
        f"projected to Flux's 19 double + 38 single blocks ({total:.1f} GiB of float32 block weights): "
        f"{projected:.0f} s per traced transformer call at this token count, same peak RSS"
    )


def _db(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="held-out calls (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument(
        "--full-width", action="store_true", help="trace cost of full-width Flux blocks instead"
    )
    parser.add_argument("--tokens", type=int, nargs=2, default=(256, 64), metavar=("IMAGE", "TEXT"))
    parser.add_argument("--blocks", type=int, nargs=2, default=(2, 2), metavar=("DOUBLE", "SINGLE"))
    _common.add_threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _common.quiet()
    if args.full_width:
        with tempfile.TemporaryDirectory() as tmp:
            full_width(*args.tokens, *args.blocks, Path(tmp))
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
