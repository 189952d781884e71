"""Tiny offline Flux Fill pipelines and fp16 overflow injection, for our tests and yours.

Everything here is built from a seed without any file or network access: random weights,
real tokenizers made in memory. Save the result with ``save_pretrained()`` and load it back
with ``from_pretrained()`` to exercise the path users take.

Overflow injection amplifies a few output channels of one layer by a power of two, so their
float32 values pass float16's maximum (65504) while every weight stays representable in
float16. The consuming layer attenuates the same channels (or a normalisation absorbs the
scale), so the float32 and bfloat16 models stay finite and the float16 model goes NaN.
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
    "MID",
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


def inject_overflow(pipe: FluxFillPipeline, site: str, block: int = 0) -> str:
    """Make ``pipe`` overflow float16 at ``site``, in place; returns the module that overflows first.

    Call it on float32 weights, before casting or saving: the injected model is the reference,
    finite in float32 and bfloat16, non-finite in float16.
    """
    if site not in INJECTION_SITES:
        raise ValueError(f"Unknown injection site {site!r}; known sites: {', '.join(INJECTION_SITES)}.")
    return INJECTION_SITES[site](pipe, block)


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
