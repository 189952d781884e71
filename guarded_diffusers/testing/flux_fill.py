"""Tiny offline Flux Fill pipelines and their fp16 overflow injection sites.

Everything here is built from a seed without any file or network access: random weights,
real tokenizers made in memory. Save the result with ``save_pretrained()`` and load it back
with ``from_pretrained()`` to exercise the path users take.

Overflow injection amplifies a few output channels of one layer by a power of two, so their
float32 values pass float16's maximum (65504) while every weight stays representable in
float16. The consuming layer attenuates the same channels (or a normalisation absorbs the
scale), so the float32 and bfloat16 models stay finite and the float16 model goes NaN.

Residual-stream injection (``RESIDUAL_SITES``) mimics how real Flux checkpoints overflow float16:
"massive activations", a channel of a block's output layer at about 1.2e5 whatever the input, gated
into the residual stream, with every weight at most 7500. A later block subtracts exactly the same
constant, so in float32 the stream is back to its normal values after it and the image still follows
the input; the output head does not read the massive channel, whose small values bfloat16 loses under
the constant. diffusers clips the single blocks' output and the double blocks' text stream to +-65504
in float16, so two of these sites stay finite in float16 (``SILENTLY_CLIPPED_SITES``): the clipped
sum leaves the cancelling block a remainder of -65504 instead of about 0, and the image is finite but
far worse than bfloat16's. The double block's image stream is not clipped, so the third goes NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

__all__ = [
    "INJECTION_SITES",
    "LASTING_STREAM_SITES",
    "MID",
    "RESIDUAL_SITES",
    "SILENTLY_CLIPPED_SITES",
    "TINY",
    "TinySpec",
    "inject_overflow",
    "sample_inputs",
    "save_tiny_pipeline",
    "tiny_flux_fill_pipeline",
]

# Largest |weight| an amplified channel may reach: far enough below 65504 that the weight
# itself stays finite in float16, large enough that its dot products pass 65504.
_AMPLIFIED_WEIGHT_MAX = 2.0**15
# Attenuation of the consuming layer's columns: keeps them normal float16 numbers
# (>= 2**-14) so float16 storage loses no more precision there than anywhere else.
_ATTENUATION = 2.0**-10
_AMPLIFIED_CHANNELS = 4
# Residual-stream sites: channels made massive, the constant pre-activation of the
# _AMPLIFIED_CHANNELS feeder rows (GELU(4) ~ 4 for any input once their weights are 0), and the
# weight reading them: 4 x GELU(4) x 7500 ~ 1.2e5, past 65504 with every weight far inside it.
# One channel, as real checkpoints have a few among thousands: bfloat16 rounds away the stream's own
# small values in it (its ulp is 128 at 3e4), which costs a 32-channel model ~7 dB of bfloat16 PSNR
# per channel the output head reads; every channel the head ignores moves float32 from the clean model.
_MASSIVE_CHANNELS = 1
_CONSTANT_PREACTIVATION = 4.0
_MASSIVE_WEIGHT = 7500.0
# Gates of the massive channels: 0.25 keeps a block's output near 3e4 (inside float16, below
# 32752) while the layer before the gate reaches 1.2e5; 0.66 puts about 8e4 into the stream itself.
_CONTAINED_GATE = 0.25
_RESIDUAL_GATE = 0.66
# Stream growth: a block's gated writes 2**17 times larger (the tiny stream's ~1 becomes ~1e5), split
# between the writers' weights (2**15: at most ~6e3) and the AdaLN gates (4), all inside float16.
_STREAM_GROWTH = 2.0**19
_GROWTH_WEIGHT = 2.0**15


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of a random Flux Fill pipeline; every constraint between components is derived."""

    num_layers: int = 1
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 16)
    latent_channels: int = 4

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


TINY = TinySpec()
MID = TinySpec(
    num_layers=2,
    num_single_layers=4,
    num_attention_heads=4,
    attention_head_dim=32,
    text_layers=2,
    vae_channels=(16, 32),
)


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer without merges: every byte is a token, no file needed."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": len(alphabet) + index for index, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a head dimension into Flux's three even rotary axes."""
    side = (head_dim // 3) // 2 * 2
    return (head_dim - 2 * side, side, side)


def tiny_flux_fill_pipeline(seed: int = 0, spec: TinySpec = TINY) -> FluxFillPipeline:
    """A complete float32 FluxFillPipeline with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    text_dim = spec.inner_dim
    vae_scale_factor = 2 ** (len(spec.vae_channels) - 1)
    packed_latent = 4 * spec.latent_channels
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=2 * packed_latent + 4 * vae_scale_factor**2,
        out_channels=packed_latent,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,
        axes_dims_rope=_rope_axes(spec.attention_head_dim),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.num_attention_heads,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = ByT5Tokenizer(model_max_length=512)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=text_dim,
            d_kv=spec.attention_head_dim,
            d_ff=2 * text_dim,
            num_layers=spec.text_layers,
            num_heads=spec.num_attention_heads,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
        )
    )
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def _power_of_two_gain(weight: torch.Tensor) -> float:
    """Largest power of two that keeps ``weight`` at or under the amplified weight maximum."""
    return 2.0 ** torch.floor(torch.log2(_AMPLIFIED_WEIGHT_MAX / weight.abs().max())).item()


@torch.no_grad()
def _amplify_channels(producer: nn.Module, consumer: nn.Linear | None, column_offset: int = 0) -> None:
    """Amplify the first output channels of ``producer``; attenuate them where ``consumer`` reads them."""
    channels = slice(0, _AMPLIFIED_CHANNELS) if consumer is not None else slice(None)
    gain = _power_of_two_gain(producer.weight[channels])
    producer.weight[channels] *= gain
    if producer.bias is not None:
        producer.bias[channels] *= gain
    if consumer is not None:
        consumer.weight[:, column_offset : column_offset + _AMPLIFIED_CHANNELS] *= _ATTENUATION


def _single_block_mlp(pipe: FluxFillPipeline, block: int) -> str:
    layer = pipe.transformer.single_transformer_blocks[block]
    _amplify_channels(layer.proj_mlp, layer.proj_out, column_offset=pipe.transformer.inner_dim)
    return f"transformer.single_transformer_blocks.{block}.proj_mlp"


def _double_block_feed_forward(stream: str) -> Callable[[FluxFillPipeline, int], str]:
    def inject(pipe: FluxFillPipeline, block: int) -> str:
        feed_forward = getattr(pipe.transformer.transformer_blocks[block], stream)
        _amplify_channels(feed_forward.net[0].proj, feed_forward.net[2])
        return f"transformer.transformer_blocks.{block}.{stream}.net.0.proj"

    return inject


def _t5_feed_forward(pipe: FluxFillPipeline, block: int) -> str:
    dense = pipe.text_encoder_2.encoder.block[block].layer[1].DenseReluDense
    _amplify_channels(dense.wi_1, dense.wo)
    return f"text_encoder_2.encoder.block.{block}.layer.1.DenseReluDense.wi_1"


def _clip_mlp(pipe: FluxFillPipeline, block: int) -> str:
    mlp = pipe.text_encoder.encoder.layers[block].mlp
    _amplify_channels(mlp.fc1, mlp.fc2)
    return f"text_encoder.encoder.layers.{block}.mlp.fc1"


def _vae_resnet(coder: str) -> Callable[[FluxFillPipeline, int], str]:
    """Amplify a whole resnet ``conv1``: the GroupNorm right after it cancels the gain in float32."""

    def inject(pipe: FluxFillPipeline, block: int) -> str:
        blocks = "up_blocks" if coder == "decoder" else "down_blocks"
        resnet = getattr(getattr(pipe.vae, coder), blocks)[block].resnets[0]
        _amplify_channels(resnet.conv1, consumer=None)
        return f"vae.{coder}.{blocks}.{block}.resnets.0.conv1"

    return inject


INJECTION_SITES: dict[str, Callable[[FluxFillPipeline, int], str]] = {
    "single_block_mlp": _single_block_mlp,
    "double_block_ff": _double_block_feed_forward("ff"),
    "double_block_ff_context": _double_block_feed_forward("ff_context"),
    "t5_ff": _t5_feed_forward,
    "clip_mlp": _clip_mlp,
    "vae_decoder": _vae_resnet("decoder"),
    "vae_encoder": _vae_resnet("encoder"),
}


@torch.no_grad()
def _massive_activation(
    feeder: nn.Linear,
    producer: nn.Linear,
    column_offset: int,
    modulation: nn.Linear,
    gate_row: int,
    gate: float,
    weight: float = _MASSIVE_WEIGHT,
) -> None:
    """Make ``producer``'s first channels ~1.2e5 for every input, and gate them into the residual stream.

    ``feeder``'s first rows become constants (weights 0, bias 4: GELU gives ~4) that ``producer`` reads at
    ``column_offset`` with ``weight``. The AdaLN ``modulation`` rows from ``gate_row`` become the constant
    ``gate`` of those channels, so the timestep cannot move how much of the 1.2e5 the residual stream gets.
    With ``-weight`` and the same gate a later block subtracts, in float32, exactly what this one added.
    """
    feeders, channels = slice(0, _AMPLIFIED_CHANNELS), slice(0, _MASSIVE_CHANNELS)
    feeder.weight[feeders] = 0.0
    feeder.bias[feeders] = _CONSTANT_PREACTIVATION
    producer.weight[channels, column_offset : column_offset + _AMPLIFIED_CHANNELS] = weight
    modulation.weight[gate_row : gate_row + _MASSIVE_CHANNELS] = 0.0
    modulation.bias[gate_row : gate_row + _MASSIVE_CHANNELS] = gate


@torch.no_grad()
def _head_ignores_massive_channels(pipe: FluxFillPipeline) -> None:
    """Zero the output head's columns of the massive channels: they carry a constant, not content."""
    pipe.transformer.proj_out.weight[:, :_MASSIVE_CHANNELS] = 0.0


def _single_block_massive(pipe: FluxFillPipeline, block: int, gate: float, weight: float) -> str:
    """Massive ``proj_out`` channels of a single block, fed by ``proj_mlp`` (its GELU follows the attention).

    A single block runs on ``cat(text, image)`` tokens: it adds the same constant to both streams.
    """
    layer, dim = pipe.transformer.single_transformer_blocks[block], pipe.transformer.inner_dim
    # AdaLayerNormZeroSingle chunks its linear into (shift, scale, gate).
    _massive_activation(layer.proj_mlp, layer.proj_out, dim, layer.norm.linear, 2 * dim, gate, weight)
    return f"transformer.single_transformer_blocks.{block}.proj_out"


def _single_block_residual(gate: float) -> Callable[[FluxFillPipeline, int], str]:
    """Massive channels added at single block ``block`` and removed again by the next one.

    In float32 the stream returns to its normal values after the cancelling block; in float16 the
    first block's sum is clipped at 65504 and the cancelling one cannot put back what was cut.
    """

    def inject(pipe: FluxFillPipeline, block: int) -> str:
        if block + 1 >= pipe.transformer.config.num_single_layers:
            raise ValueError(
                f"Single block {block} needs a next single block to cancel its massive channels."
            )
        module = _single_block_massive(pipe, block, gate, _MASSIVE_WEIGHT)
        _single_block_massive(pipe, block + 1, gate, -_MASSIVE_WEIGHT)
        _head_ignores_massive_channels(pipe)
        return module

    return inject


def _double_block_massive_channel(pipe: FluxFillPipeline, block: int) -> str:
    """Massive image feed-forward output: diffusers does not clip the double block's image stream.

    Single blocks cannot tell image tokens from text tokens, so the block's text feed-forward adds the
    same constant to the text stream (after the image one: ``ff.net.2`` stays the first to overflow).
    Nothing removes it: every later LayerNorm and ``norm_out`` read it, as real massive activations.
    """
    layer, dim = pipe.transformer.transformer_blocks[block], pipe.transformer.inner_dim
    # AdaLayerNormZero chunks into (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
    for feed_forward, norm in ((layer.ff, layer.norm1), (layer.ff_context, layer.norm1_context)):
        _massive_activation(
            feed_forward.net[0].proj, feed_forward.net[2], 0, norm.linear, 5 * dim, _RESIDUAL_GATE
        )
    _head_ignores_massive_channels(pipe)
    return f"transformer.transformer_blocks.{block}.ff.net.2"


def _double_block_ff_residual(pipe: FluxFillPipeline, block: int) -> str:
    """``_double_block_massive_channel``, removed again from every token by single block 0."""
    module = _double_block_massive_channel(pipe, block)
    _single_block_massive(pipe, 0, _RESIDUAL_GATE, -_MASSIVE_WEIGHT)
    return module


@torch.no_grad()
def _grow(writers: list[nn.Linear], modulation: nn.Linear, gate_rows: list[int], dim: int) -> None:
    """Make ``writers``' gated contributions to the stream ``_STREAM_GROWTH`` times larger.

    The writers' weights and biases take ``_GROWTH_WEIGHT``, the AdaLN gates (``modulation``'s rows
    from each of ``gate_rows``) the rest, so every weight stays inside float16's range.
    """
    for writer in writers:
        writer.weight *= _GROWTH_WEIGHT
        writer.bias *= _GROWTH_WEIGHT
    for row in gate_rows:
        modulation.weight[row : row + dim] *= _STREAM_GROWTH / _GROWTH_WEIGHT
        modulation.bias[row : row + dim] *= _STREAM_GROWTH / _GROWTH_WEIGHT


def _double_block_stream_growth(pipe: FluxFillPipeline, block: int) -> str:
    """Double block ``block`` writes 2**17 times more into both streams: the image stream passes 65504."""
    layer, dim = pipe.transformer.transformer_blocks[block], pipe.transformer.inner_dim
    gates = [2 * dim, 5 * dim]  # gate_msa, gate_mlp
    _grow([layer.attn.to_out[0], layer.ff.net[2]], layer.norm1.linear, gates, dim)
    _grow([layer.attn.to_add_out, layer.ff_context.net[2]], layer.norm1_context.linear, gates, dim)
    return f"transformer.transformer_blocks.{block}.attn.to_out.0"


def _single_block_stream_growth(pipe: FluxFillPipeline, block: int) -> str:
    """Single block ``block`` writes 2**17 times more into the stream, which diffusers clips at 65504."""
    layer, dim = pipe.transformer.single_transformer_blocks[block], pipe.transformer.inner_dim
    # AdaLayerNormZeroSingle chunks its linear into (shift, scale, gate).
    _grow([layer.proj_out], layer.norm.linear, [2 * dim], dim)
    return f"transformer.single_transformer_blocks.{block}.proj_out"


# Kept apart from INJECTION_SITES: not every site here makes float16 non-finite.
RESIDUAL_SITES: dict[str, Callable[[FluxFillPipeline, int], str]] = {
    "single_block_proj_out": _single_block_residual(_CONTAINED_GATE),
    "single_block_residual": _single_block_residual(_RESIDUAL_GATE),
    "double_block_ff_residual": _double_block_ff_residual,
}
# Residual-stream overflows that last to the output norm: nothing cancels them. A massive channel that
# every later LayerNorm reads, or blocks whose writes make the whole stream grow past 65504, as the
# stream of real checkpoints grows through their blocks. Added after the bake and kept out of its
# development: held-out cases for it (bench/bake.py).
LASTING_STREAM_SITES: dict[str, Callable[[FluxFillPipeline, int], str]] = {
    "double_block_massive_channel": _double_block_massive_channel,
    "double_block_stream_growth": _double_block_stream_growth,
    "single_block_stream_growth": _single_block_stream_growth,
}
# Residual sites that plain float16 clips at +-65504: finite images from a wrong residual stream, no NaN.
# The cancelling block turns the clipped 65504 into -65504 (its own gated sum overflows and is clipped
# too), where float32 has the stream's normal value: that channel then dominates every later per-token
# LayerNorm, and the float16 image is far worse than bfloat16's against float32.
SILENTLY_CLIPPED_SITES: tuple[str, ...] = ("single_block_proj_out", "single_block_residual")


def inject_overflow(pipe: FluxFillPipeline, site: str, block: int = 0) -> str:
    """Make ``pipe`` overflow float16 at ``site``, in place; returns the module that overflows first.

    Call it on float32 weights, before casting or saving: the injected model is the reference,
    finite in float32 and bfloat16. In float16 it is non-finite, except at the
    ``SILENTLY_CLIPPED_SITES``, where diffusers' clipping keeps it finite and wrong.
    """
    sites = {**INJECTION_SITES, **RESIDUAL_SITES, **LASTING_STREAM_SITES}
    if site not in sites:
        raise ValueError(
            f"Unknown injection site {site!r}; known sites: {', '.join(INJECTION_SITES)};"
            f" residual-stream sites: {', '.join(RESIDUAL_SITES)};"
            f" lasting stream sites: {', '.join(LASTING_STREAM_SITES)}."
        )
    return sites[site](pipe, block)


def save_tiny_pipeline(
    path: str | Path, site: str | None = None, seed: int = 0, spec: TinySpec = TINY
) -> str | None:
    """Build a tiny pipeline, optionally inject an overflow, save it; returns the overflowing module."""
    pipe = tiny_flux_fill_pipeline(seed, spec)
    module = inject_overflow(pipe, site) if site is not None else None
    pipe.save_pretrained(path)
    return module


def sample_inputs(size: int = 32, seed: int = 0) -> dict[str, object]:
    """A deterministic image, a centred rectangular mask and a prompt for a ``size`` x ``size`` fill."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return {
        "prompt": "a red fox in the snow",
        "image": Image.fromarray(pixels),
        "mask_image": Image.fromarray(mask.numpy(), mode="L"),
        "height": size,
        "width": size,
    }
