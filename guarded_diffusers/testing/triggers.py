"""Tiny models whose float16 overflow only some inputs trigger: the measure of an input search.

Real float16 overflows depend on the input: some prompts overflow T5 and others do not, a large flat
region or an almost full mask drives a normalisation to extreme values. The sites here overflow
float16 only for some inputs (a few token ids, a mask covering almost all of the image, saturated
pixels); float32 and bfloat16 stay finite for every input. ``bench/search.py`` measures how soon a
search finds them; the plugin's tests use them as models with input-dependent failures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxFillPipeline
from torch import nn

from .flux_fill import TINY, TinySpec, tiny_flux_fill_pipeline

# Feed-forward rows that read a trigger direction (the other rows keep their random weights).
_TRIGGER_CHANNELS = 4
TRIGGER_TOKEN_COUNT = 3
# A trigger token's embedding: this length along one unit direction ``v`` that no other token, no
# position and no attention output has any component along; the first block's normalisation then
# gives the token about sqrt(d_model) along ``v`` (5.7 for the tiny models) and every other token 0.
_TRIGGER_EMBEDDING = 64.0
# The feed-forward rows reading ``v``: 2**14 x 5.7 ~ 9.3e4, past 65504, with every weight in range.
_TRIGGER_GAIN = 2.0**14
# Mask coverage: the encoder's first GroupNorm gives an unpainted pixel about 1/sqrt(unpainted share)
# (flat images exactly); the conv reading it reaches the saturation band from about 5.3: a mask
# covering 96 % of a flat image, about 75 % of a noisy one, but not all of it (nothing left to normalise).
_COVERAGE_GAIN = 12288.0  # 1.5 * 2**13, exact in float16
# Image saturation: the sum of a 3x3 RGB patch of [-1, 1] pixels, times this, passes 65504 when the
# patch averages beyond 0.89 of full scale: pixels at or above ~241 (or at or below ~14) in all channels.
_SATURATION_PATCH_SUM = 24.0
_SATURATION_GAIN = 65504.0 / _SATURATION_PATCH_SUM


def reachable_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Token ids a prompt can produce: ``t`` is reachable when tokenizing ``decode([t, t])`` gives ``t``.

    A lowercasing tokenizer cannot produce an upper-case token; a byte-level one cannot produce a lone
    UTF-8 continuation byte from text. One batched decode and one batched tokenization.
    """
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[token, token] for token in range(size)])
    encoded = tokenizer(texts, add_special_tokens=False).input_ids
    return tuple(token for token, ids in zip(range(size), encoded, strict=True) if token in ids)


def trigger_token_ids(tokenizer: Any, count: int = TRIGGER_TOKEN_COUNT, seed: int = 0) -> list[int]:
    """``count`` reachable, non-special token ids of ``tokenizer``, drawn from ``seed``."""
    # Not a special token, nor one of U+FFFD's: decoding invalid byte sequences produces that.
    excluded = {*tokenizer.all_special_ids, *tokenizer("\ufffd", add_special_tokens=False).input_ids}
    candidates = [token for token in reachable_token_ids(tokenizer) if token not in excluded]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(candidates), generator=generator)[:count]
    return sorted(candidates[int(index)] for index in order)


def _trigger_direction(dim: int, seed: int) -> torch.Tensor:
    """A unit vector with zero mean: a LayerNorm's mean subtraction leaves its component alone."""
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    direction -= direction.mean()
    return direction / direction.norm()


def _without(direction: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (one vector per row) with their component along ``direction`` removed."""
    return rows - (rows @ direction)[..., None] * direction


@torch.no_grad()
def _token_trigger(
    embeddings: list[nn.Embedding],
    unaligned: list[torch.Tensor],
    producers: list[tuple[nn.Linear, float]],
    consumer: nn.Linear,
    token_ids: Sequence[int],
    seed: int,
) -> None:
    """Trigger tokens embed along a direction nothing else has; ``producers`` read that direction.

    ``unaligned`` are tensors whose values add to the stream before the producers' norm (position
    embeddings, the attention's output projection and bias): their component along the direction is
    removed, so a prompt without trigger tokens gives the producers' rows exactly 0 in float32. Each
    producer's first rows become ``gain`` times the direction; ``consumer`` ignores those channels.
    """
    direction = _trigger_direction(embeddings[0].weight.shape[1], seed)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    for embedding in {id(e.weight): e for e in embeddings}.values():  # tied embeddings once
        embedding.weight.copy_(_without(direction, embedding.weight))
        embedding.weight[ids] = _TRIGGER_EMBEDDING * direction
    for tensor in unaligned:  # vectors (bias, embedding rows) or a Linear weight (its columns)
        if tensor.shape[-1] == direction.numel():
            tensor.copy_(_without(direction, tensor))
        else:
            tensor.copy_(_without(direction, tensor.T).T)
    rows = slice(0, _TRIGGER_CHANNELS)
    for producer, gain in producers:
        producer.weight[rows] = gain * direction
        if producer.bias is not None:
            producer.bias[rows] = 0.0
    consumer.weight[:, rows] = 0.0  # float32 gives every prompt, trigger or not, what it gave before


def inject_token_overflow(
    pipe: FluxFillPipeline, encoder: str, token_ids: Sequence[int], seed: int = 0
) -> str:
    """Make ``encoder``'s (``"t5"`` or ``"clip"``) first feed-forward overflow float16 for ``token_ids`` only.

    The trigger tokens' embedding rows become one direction (length 64) that no other token, position
    or attention output has a component along; the first block's feed-forward reads that direction
    with weights 2**14, past 65504 once normalised, and the next layer ignores those channels. A
    prompt without the tokens gives those rows 0. Returns the module that overflows first.
    """
    if encoder == "t5":
        t5 = pipe.text_encoder_2
        block = t5.encoder.block[0]
        dense = block.layer[1].DenseReluDense
        embeddings = [t5.encoder.embed_tokens, t5.shared]
        attention_out = [block.layer[0].SelfAttention.o.weight]
        # Gated: gelu(wi_0 x) * wi_1 x. The gate reads the direction at gain 1, wi_1 at 2**14.
        producers = [(dense.wi_0, 1.0), (dense.wi_1, _TRIGGER_GAIN)]
        _token_trigger(embeddings, attention_out, producers, dense.wo, token_ids, seed)
        return "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_1"
    if encoder == "clip":
        clip = pipe.text_encoder
        layer = clip.encoder.layers[0]
        unaligned = [
            clip.embeddings.position_embedding.weight,
            layer.self_attn.out_proj.weight,
            layer.self_attn.out_proj.bias,
            layer.layer_norm2.bias,
        ]
        with torch.no_grad():
            layer.layer_norm2.weight.fill_(1.0)  # a uniform scale keeps the direction's component its own
        producers = [(layer.mlp.fc1, _TRIGGER_GAIN)]
        _token_trigger(
            [clip.embeddings.token_embedding], unaligned, producers, layer.mlp.fc2, token_ids, seed
        )
        return "text_encoder.encoder.layers.0.mlp.fc1"
    raise ValueError(f"encoder must be 't5' or 'clip', got {encoder!r}.")


@torch.no_grad()
def inject_mask_coverage_overflow(pipe: FluxFillPipeline) -> str:
    """Overflow float16 in the VAE encoder when the mask covers almost all of the image, but not all.

    FluxFillPipeline encodes ``image * (1 - mask)``: painted pixels are 0. Two channels of ``conv_in``
    carry +-(R+G+B) of each pixel and form one group of the first resnet's ``norm1``, whose variance
    then comes from the unpainted pixels only: the fewer they are, the larger their normalised values
    (1/sqrt(unpainted share) for a flat image). ``conv1`` reads those two channels with weights 12288,
    past float16's range from about 96 % coverage of a flat image (75 % of uniform noise, whose
    brightest pixels sit further from the mean); ``norm2`` cancels the gain in float32.
    """
    encoder = pipe.vae.encoder
    resnet = encoder.down_blocks[0].resnets[0]
    pair = slice(0, 2)
    encoder.conv_in.weight[pair] = 0.0
    encoder.conv_in.weight[0, :, 1, 1] = 1.0
    encoder.conv_in.weight[1, :, 1, 1] = -1.0
    encoder.conv_in.bias[pair] = 0.0
    resnet.norm1.weight[pair] = 1.0
    resnet.norm1.bias[pair] = 0.0
    resnet.conv1.weight[pair] = 0.0
    resnet.conv1.weight[0, 0, 1, 1] = _COVERAGE_GAIN
    resnet.conv1.weight[1, 1, 1, 1] = _COVERAGE_GAIN
    resnet.conv1.bias[pair] = 0.0
    return "vae.encoder.down_blocks.0.resnets.0.conv1"


@torch.no_grad()
def inject_image_saturation_overflow(pipe: FluxFillPipeline) -> str:
    """Overflow float16 in the VAE encoder's ``conv_in`` where a 3x3 patch of the image is saturated.

    Two channels of ``conv_in`` sum a 3x3 RGB patch, with weights +-2730: past 65504 when the patch
    averages more than 0.89 of full scale (white or black, not grey or noise). The first resnet's
    ``norm1`` is scale-free for that channel pair and the downsampler reads them attenuated, so float32
    and bfloat16 carry the same image; the resnet's identity shortcut only adds the big values to them.
    """
    encoder = pipe.vae.encoder
    pair = slice(0, 2)
    encoder.conv_in.weight[0] = _SATURATION_GAIN
    encoder.conv_in.weight[1] = -_SATURATION_GAIN
    encoder.conv_in.bias[pair] = 0.0
    downsampler = encoder.down_blocks[0].downsamplers[0].conv
    downsampler.weight[:, pair] /= _SATURATION_GAIN
    return "vae.encoder.conv_in"


def _token_site(encoder: str) -> Callable[[FluxFillPipeline], str]:
    def inject(pipe: FluxFillPipeline) -> str:
        tokenizer = pipe.tokenizer_2 if encoder == "t5" else pipe.tokenizer
        return inject_token_overflow(pipe, encoder, trigger_token_ids(tokenizer))

    return inject


# Input-triggered sites: float16 overflows only for some inputs (a prompt holding one of
# ``trigger_token_ids(tokenizer)``, an almost full mask, saturated pixels); float32 and bfloat16 never.
TRIGGERED_SITES: dict[str, Callable[[FluxFillPipeline], str]] = {
    "t5_tokens": _token_site("t5"),
    "clip_tokens": _token_site("clip"),
    "mask_coverage": inject_mask_coverage_overflow,
    "image_saturation": inject_image_saturation_overflow,
}


def inject_triggered_overflow(pipe: FluxFillPipeline, site: str) -> str:
    """Make ``pipe`` overflow float16 for some inputs only (``TRIGGERED_SITES``); returns the module."""
    if site not in TRIGGERED_SITES:
        raise ValueError(f"Unknown triggered site {site!r}; known: {', '.join(TRIGGERED_SITES)}.")
    return TRIGGERED_SITES[site](pipe)


def save_triggered_pipeline(path: str | Path, site: str, seed: int = 0, spec: TinySpec = TINY) -> str:
    """Build a tiny pipeline, inject the input-triggered overflow ``site``, save it; returns the module."""
    pipe = tiny_flux_fill_pipeline(seed, spec)
    module = inject_triggered_overflow(pipe, site)
    pipe.save_pretrained(path)
    return module
