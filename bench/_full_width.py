"""``bench/bake.py --full-width``: the streamed bake end to end at Flux's width, one block at a time.

A child process (its memory is not the bake's) saves a FluxFillPipeline with random weights: the
transformer at Flux's width (3072: 24 heads of 128, joint attention 4096, pooled projection 768)
with a few double and single blocks, T5 at T5-XXL's width (d_model 4096, d_ff 10240, 64 heads,
vocabulary 32128) with one layer, CLIP at CLIP-L's width (768) with one layer, the tiny VAE, and
``double_block_ff_residual`` injected so that the stream cut is scaled. This process then runs
what ``fluxguard bake`` runs: ``load_streamed``, ``bake(..., weights=streamed)`` on one call,
``write_baked``. It reports every block's time in every pass of the bake (its weights read
included), peak RSS against the largest block + 2 GiB, and the passes projected to Flux's 19 double
and 38 single blocks and T5-XXL's 24 layers.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

import _common

from guarded_diffusers.baking.run import BakeError, bake
from guarded_diffusers.baking.streamed import load_streamed
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.core.stream import residual_blocks
from guarded_diffusers.testing import sample_inputs

FLUX = {"double": 19, "single": 38, "t5": 24}
SITE = "double_block_ff_residual"


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _save_pipeline(path: str, double: int, single: int) -> None:
    """In the child: the full-width pipeline, injected, saved in 2 GB shards as real checkpoints are."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from guarded_diffusers.testing import inject_overflow, tiny_flux_fill_pipeline

    tiny = tiny_flux_fill_pipeline(0)
    tokenizer = tiny.tokenizer
    transformer = FluxTransformer2DModel(
        in_channels=tiny.transformer.config.in_channels,
        out_channels=tiny.transformer.config.out_channels,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=1,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
        )
    )
    pipe = FluxFillPipeline(
        scheduler=tiny.scheduler,
        vae=tiny.vae,
        text_encoder=clip.eval(),
        tokenizer=tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=tiny.tokenizer_2,
        transformer=transformer.eval(),
    )
    inject_overflow(pipe, SITE)
    pipe.save_pretrained(path, max_shard_size="2GB")


class BlockClock:
    """Forward hooks timing each Flux and T5 block, bucketed by the bake's progress messages (one per
    pass). Registered before the bake streams, so each time includes reading the block's weights; the
    cast copies are deep copies and carry the same hooks."""

    def __init__(self, pipe: Any) -> None:
        self.samples: dict[str, list[float]] = {}
        self.passes: list[tuple[str, dict[str, list[float]], float, float]] = []
        self._since = time.perf_counter()
        kinds = {
            "double": pipe.transformer.transformer_blocks,
            "single": pipe.transformer.single_transformer_blocks,
            "t5": pipe.text_encoder_2.encoder.block,
        }
        for kind, blocks in kinds.items():
            for block in blocks:
                started: list[float] = []
                block.register_forward_pre_hook(
                    lambda *_, started=started: started.append(time.perf_counter())
                )
                block.register_forward_hook(
                    lambda *_, kind=kind, started=started: self.samples.setdefault(kind, []).append(
                        time.perf_counter() - started.pop()
                    )
                )

    def progress(self, message: str) -> None:
        now = time.perf_counter()
        self.passes.append((message, dict(self.samples), now - self._since, _rss_gib()))
        self.samples, self._since = {}, now


def full_width(
    image_tokens: int, text_tokens: int, double: int, single: int, steps: int, folder: Path
) -> None:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"--tokens: {image_tokens} image tokens is not a square")
    src, out = folder / "src", folder / "out"
    child = multiprocessing.get_context("spawn").Process(
        target=_save_pipeline, args=(str(src), double, single)
    )
    child.start()
    child.join()
    clock_load = time.perf_counter()
    streamed = load_streamed(src)
    load_seconds = time.perf_counter() - clock_load
    pipe = streamed.pipe
    loaded_rss = _rss_gib()
    held = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters() if not p.is_meta)
    held += sum(p.numel() * p.element_size() for p in pipe.text_encoder_2.parameters() if not p.is_meta)
    sizes = {
        kind: sum(p.numel() for p in blocks[0].parameters())
        for kind, blocks in (
            ("double", pipe.transformer.transformer_blocks),
            ("single", pipe.transformer.single_transformer_blocks),
            ("t5", pipe.text_encoder_2.encoder.block),
        )
    }
    largest = max(
        sum(p.numel() * 4 for p in block.parameters())
        for component in streamed.files
        for block in residual_blocks(getattr(pipe, component))
    )
    clock = BlockClock(pipe)
    # The VAE's scale factor is 2 and Flux packs 2x2 latents: image tokens = (size / 4) ** 2.
    call = {
        **sample_inputs(4 * side),
        "num_inference_steps": steps,
        "max_sequence_length": text_tokens,
        "seed": 0,
    }
    started = time.perf_counter()
    try:
        result = bake(pipe, [call], progress=clock.progress, weights=streamed)
        refused = None
    except BakeError as error:
        result, refused = error.result, str(error)
    bake_seconds = time.perf_counter() - started
    baked_rss = _rss_gib()
    started = time.perf_counter()
    if refused is None:
        write_baked(src, out, result)
    write_seconds = time.perf_counter() - started

    print(_common.machine_summary())
    print(
        f"synthetic Flux Fill at full width: {double} double + {single} single blocks, T5 at width 4096 with "
        f"1 layer, every block streamed from 2 GB safetensors shards; {image_tokens} image + {text_tokens} "
        f"text tokens, 1 call of {steps} steps"
    )
    print("| pass | double block | single block | T5 block | pass, wall | peak RSS so far |")
    print("|---|---|---|---|---|---|")
    projected = 0.0
    for label, samples, wall, rss in clock.passes:
        mean = {kind: sum(times) / len(times) for kind, times in samples.items() if times}
        cells = [f"{mean[kind]:.2f} s" if kind in mean else "-" for kind in ("double", "single", "t5")]
        print(f"| {label} | {' | '.join(cells)} | {wall:.1f} s | {rss:.2f} GiB |")
        measured = sum(sum(times) for times in samples.values())
        scale = {"double": FLUX["double"] / double, "single": FLUX["single"] / single, "t5": FLUX["t5"]}
        projected += wall - measured + sum(sum(samples.get(kind, [])) * scale[kind] for kind in FLUX)
    budget = largest / 2**30 + 2
    print(
        f"blocks: double {sizes['double'] / 1e6:.0f} M parameters "
        f"({sizes['double'] * 4 / 2**30:.2f} GiB fp32), "
        f"single {sizes['single'] / 1e6:.0f} M ({sizes['single'] * 4 / 2**30:.2f} GiB), "
        f"T5 layer {sizes['t5'] / 1e6:.0f} M ({sizes['t5'] * 4 / 2**30:.2f} GiB); transformer and T5 "
        f"weights outside blocks held: {held / 2**30:.2f} GiB"
    )
    print(
        f"passes: {len(clock.passes)}; load {load_seconds:.1f} s, bake {bake_seconds:.1f} s, "
        f"write {write_seconds:.1f} s ({'written' if refused is None else 'refused: ' + refused})"
    )
    print(
        f"peak RSS: {loaded_rss:.2f} GiB loaded, {baked_rss:.2f} GiB after the bake, "
        f"{_rss_gib():.2f} GiB after the write; budget largest block + 2 GiB = {budget:.2f} GiB"
    )
    print(
        "result: "
        + ", ".join(f"{choice.cut.name} k={choice.k}" for choice in result.scaled)
        + f"; checks {result.checks.to_dict()}; remaining {[item.module for item in result.remaining]}"
    )
    total = (
        FLUX["double"] * sizes["double"] + FLUX["single"] * sizes["single"] + FLUX["t5"] * sizes["t5"]
    ) * 4
    print(
        f"projected to Flux's 19 double + 38 single blocks and T5-XXL's 24 layers "
        f"({total / 2**30:.1f} GiB of float32 block weights): {projected / 60:.1f} min for this bake "
        f"(the same passes, 1 call of {steps} steps at this token count), peak RSS the same "
        f"plus CLIP-L's and the VAE's weights outside blocks (about 0.15 GiB)"
    )
