"""Tiny offline pipelines of every family the guard covers, built from the Flux Fill one's parts.

Each builder first draws the tiny Flux Fill pipeline from ``seed`` and keeps its offline tokenizers,
text encoders and VAE configuration, so every family shares the sizes of ``spec`` and needs no file
or network; what a family has beyond them (its denoiser, a CLIP with projection, its scheduler) is
drawn from the same random stream right after. QwenImage shares no component with Fill: its causal
3D VAE, Qwen2.5-VL text encoder and Qwen2 tokenizer are made from ``spec``'s sizes alone. All of them
are float32: inject, save, then load in the dtype under test.
"""

from __future__ import annotations

import copy

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5EncoderModel,
)

from .flux_fill import TINY, TinySpec, _rope_axes, tiny_flux_fill_pipeline

__all__ = [
    "tiny_flux_kontext_pipeline",
    "tiny_flux_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
]

# Stable Diffusion's VAE latent scales (the released checkpoints' ``scaling_factor``).
_SD15_LATENT_SCALE = 0.18215
_SDXL_LATENT_SCALE = 0.13025
# SDXL's micro-conditioning: six sizes, each embedded in this many channels (the real model has 256).
_SDXL_TIME_IDS = 6
_SDXL_TIME_EMBED_DIM = 8
# The noise schedule both Stable Diffusion UNet families were trained with.
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
# Qwen2.5-VL's chat and vision tokens: QwenImagePipeline's prompt template is a chat turn.
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-VL's config names for its vision markers, and the markers.
_QWEN_VISION_MARKERS = {
    "vision_start": "vision_start",
    "vision_end": "vision_end",
    "image": "image_pad",
    "video": "video_pad",
}


def _flux_parts(seed: int, spec: TinySpec) -> dict[str, object]:
    """The Fill pipeline's components with a transformer that reads only the noisy latents.

    Flux text-to-image and Kontext pack the latents alone into the transformer's input channels
    (Kontext appends the reference image as more tokens, not more channels).
    """
    fill = tiny_flux_fill_pipeline(seed, spec)
    packed_latents = fill.transformer.config.out_channels
    transformer = FluxTransformer2DModel.from_config(fill.transformer.config, in_channels=packed_latents)
    return {**fill.components, "transformer": transformer.eval()}


def tiny_flux_pipeline(seed: int = 0, spec: TinySpec = TINY) -> FluxPipeline:
    """A float32 Flux text-to-image pipeline with random weights drawn from ``seed``."""
    return FluxPipeline(**_flux_parts(seed, spec))


def tiny_flux_kontext_pipeline(seed: int = 0, spec: TinySpec = TINY) -> FluxKontextPipeline:
    """A float32 Flux Kontext (image editing) pipeline with random weights drawn from ``seed``."""
    return FluxKontextPipeline(**_flux_parts(seed, spec))


def _latent_size(fill: FluxFillPipeline) -> int:
    """The latent side of the VAE's native image size."""
    return fill.vae.config.sample_size // 2 ** (len(fill.vae.config.block_out_channels) - 1)


def _clip_with_projection(fill: FluxFillPipeline) -> CLIPTextModelWithProjection:
    """A CLIP text encoder of Fill's size that also returns pooled, projected embeddings."""
    return CLIPTextModelWithProjection(fill.text_encoder.config).eval()


def tiny_sd3_pipeline(seed: int = 0, spec: TinySpec = TINY) -> StableDiffusion3Pipeline:
    """A float32 Stable Diffusion 3 pipeline with random weights drawn from ``seed``.

    SD3 concatenates both CLIPs' hidden states and pads them to T5's width: T5 is twice CLIP's.
    """
    fill = tiny_flux_fill_pipeline(seed, spec)
    clip = fill.text_encoder.config
    t5_config = copy.deepcopy(fill.text_encoder_2.config)
    t5_config.d_model = 2 * clip.hidden_size
    latent_channels = fill.vae.config.latent_channels
    transformer = SD3Transformer2DModel(
        sample_size=_latent_size(fill),
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        # The last joint block reads the text without updating it; one more keeps a full one.
        num_layers=spec.num_layers + 1,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=t5_config.d_model,
        caption_projection_dim=spec.inner_dim,
        pooled_projection_dim=2 * clip.projection_dim,
        pos_embed_max_size=_latent_size(fill),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=fill.vae,
        text_encoder=_clip_with_projection(fill),
        tokenizer=fill.tokenizer,
        text_encoder_2=_clip_with_projection(fill),
        tokenizer_2=fill.tokenizer,
        text_encoder_3=T5EncoderModel(t5_config).eval(),
        tokenizer_3=fill.tokenizer_2,
    )


def _sd_vae(fill: FluxFillPipeline, scaling_factor: float) -> AutoencoderKL:
    """Fill's VAE shape with Stable Diffusion's quant convs, no shift, and its latent scale.

    ``force_upcast`` as SDXL's released VAE config has it: SDXL pipelines then decode float16
    latents with the whole VAE in float32; Stable Diffusion 1.5's pipeline ignores the flag.
    """
    return AutoencoderKL.from_config(
        fill.vae.config,
        use_quant_conv=True,
        use_post_quant_conv=True,
        shift_factor=None,
        scaling_factor=scaling_factor,
        force_upcast=True,
    ).eval()


def _unet(
    fill: FluxFillPipeline, spec: TinySpec, cross_attention_dim: int, **extra: object
) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention in its lower level and middle, sized from ``spec``."""
    latent_channels = fill.vae.config.latent_channels
    return UNet2DConditionModel(
        sample_size=_latent_size(fill),
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(spec.inner_dim, 2 * spec.inner_dim),
        layers_per_block=1,
        # UNet2DConditionModel's historical name for the number of heads.
        attention_head_dim=spec.num_attention_heads,
        norm_num_groups=fill.vae.config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        **extra,
    ).eval()


def tiny_sdxl_pipeline(seed: int = 0, spec: TinySpec = TINY) -> StableDiffusionXLPipeline:
    """A float32 SDXL pipeline with random weights drawn from ``seed``; its VAE has ``force_upcast``.

    SDXL's UNet reads both CLIPs' hidden states side by side, and the second one's pooled
    projection with the six size conditions embedded.
    """
    fill = tiny_flux_fill_pipeline(seed, spec)
    clip = fill.text_encoder.config
    unet = _unet(
        fill,
        spec,
        cross_attention_dim=2 * clip.hidden_size,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_SDXL_TIME_IDS * _SDXL_TIME_EMBED_DIM + clip.projection_dim,
    )
    return StableDiffusionXLPipeline(
        vae=_sd_vae(fill, _SDXL_LATENT_SCALE),
        text_encoder=fill.text_encoder,
        text_encoder_2=_clip_with_projection(fill),
        tokenizer=fill.tokenizer,
        tokenizer_2=fill.tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading"),
        add_watermarker=False,
    )


def tiny_sd15_pipeline(seed: int = 0, spec: TinySpec = TINY) -> StableDiffusionPipeline:
    """A float32 Stable Diffusion 1.5 pipeline with random weights drawn from ``seed``; no safety checker."""
    fill = tiny_flux_fill_pipeline(seed, spec)
    return StableDiffusionPipeline(
        vae=_sd_vae(fill, _SD15_LATENT_SCALE),
        text_encoder=fill.text_encoder,
        tokenizer=fill.tokenizer,
        unet=_unet(fill, spec, cross_attention_dim=fill.text_encoder.config.hidden_size),
        scheduler=PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _qwen_tokenizer(template: str) -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer whose merges make every word of ``template`` one token.

    Every byte is a token, so any prompt round-trips; the merges grow each word of the template from
    its first byte, so the template's system turn is as many tokens as with Qwen's own vocabulary
    (the 34 ``QwenImagePipeline`` drops). The chat and vision markers are special tokens.
    """
    alphabet = sorted(ByteLevel.alphabet())
    bytes_only = Qwen2Tokenizer(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[])
    pre_tokenize = bytes_only.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    text = template
    for token in _QWEN_SPECIAL_TOKENS:
        text = text.replace(token, "\n")
    words = [word for word, _ in pre_tokenize(text)]
    merges = list(
        dict.fromkeys((word[: end - 1], word[end - 1]) for word in words for end in range(2, len(word) + 1))
    )
    vocab = {
        symbol: index for index, symbol in enumerate(dict.fromkeys([*alphabet, *(a + b for a, b in merges)]))
    }
    vocab.update({token: len(vocab) + index for index, token in enumerate(_QWEN_SPECIAL_TOKENS)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )


def _qwen_text_encoder(tokenizer: Qwen2Tokenizer, spec: TinySpec) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with ``spec``'s text sizes; its vision tower (never run for a text prompt) as small."""
    width = spec.inner_dim
    half_head = spec.attention_head_dim // 2
    # Multimodal rotary sections (time, height, width) of half a head, in Qwen2.5-VL's 1:1.5:1.5 ratio.
    mrope_section = [half_head - 2 * (3 * half_head // 8), 3 * half_head // 8, 3 * half_head // 8]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_attention_heads,
            "max_position_embeddings": tokenizer.model_max_length,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
            "bos_token_id": None,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": spec.text_layers,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_heads": spec.num_attention_heads,
            "out_hidden_size": width,
            "fullatt_block_indexes": [spec.text_layers - 1],
        },
        **{
            f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{marker}|>")
            for name, marker in _QWEN_VISION_MARKERS.items()
        },
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_pipeline(seed: int = 0, spec: TinySpec = TINY) -> QwenImagePipeline:
    """A float32 QwenImage pipeline with random weights drawn from ``seed``.

    Qwen's VAE is the causal 3D one of Wan, sized like Fill's (``spec.vae_channels``, one latent frame
    per image); its transformer's double-stream blocks read the text encoder's last hidden states.
    """
    torch.manual_seed(seed)
    base = spec.vae_channels[0]
    vae = AutoencoderKLQwenImage(
        base_dim=base,
        z_dim=spec.latent_channels,
        dim_mult=[channels // base for channels in spec.vae_channels],
        num_res_blocks=1,
        temperal_downsample=[False] * (len(spec.vae_channels) - 1),
        latents_mean=[0.0] * spec.latent_channels,
        latents_std=[1.0] * spec.latent_channels,
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * spec.latent_channels,
        out_channels=spec.latent_channels,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.inner_dim,
        axes_dims_rope=_rope_axes(spec.attention_head_dim),
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer.eval(),
    )
    tokenizer = _qwen_tokenizer(pipe.prompt_template_encode)
    pipe.register_modules(text_encoder=_qwen_text_encoder(tokenizer, spec), tokenizer=tokenizer)
    return pipe
