"""Hypothesis strategies for pipeline inputs, for the plugin's items and for your own ``@given`` tests.

``fill_inputs`` draws whole FluxFillPipeline calls, ``call_inputs`` those of any pipeline's call
(``call_shape(pipe)``: text to image draws no image or mask). Every strategy leans towards the
edges where float16 breaks: empty, full and almost full masks, saturated images, the largest
guidance, prompts past the token limit, and prompts made of any token the model's own tokenizers
can produce.
Pictures are built by :mod:`pytest_fluxguard.recipes`, so a failing example prints as calls you can
paste back. Draw ``seeds()`` for the torch generator: hypothesis does not manage torch's RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from PIL import Image

from . import recipes
from .calls import CallShape, call_shape
from .inputs import FillInputs
from .vocabulary import Vocabulary, pipeline_vocabularies

__all__ = [
    "FLUX_FILL_GUIDANCE",
    "CallShape",
    "FillInputs",
    "call_inputs",
    "call_shape",
    "fill_inputs",
    "guidance_scales",
    "images",
    "images_per_prompt",
    "inference_steps",
    "lora_scales",
    "masks",
    "pipeline_vocabularies",
    "prompts",
    "realistic_prompts",
    "seeds",
    "side_lengths",
    "sizes",
    "strengths",
    "token_prompts",
]

FLUX_FILL_GUIDANCE = 30.0  # FluxFillPipeline's default guidance_scale
FLUX_SIZE_MULTIPLE = 16  # 2 * vae_scale_factor of the released Flux VAE
# FluxFillPipeline's call takes these of the arguments a drawn call can hold.
FLUX_FILL_PARAMETERS = frozenset(("image", "mask_image", "strength", "max_sequence_length"))
# Below this, steps * strength can round to zero denoising steps and FluxFillPipeline refuses the call.
MIN_STRENGTH = 0.01
_CHANNEL = st.integers(0, 255)
_COLOUR = st.tuples(_CHANNEL, _CHANNEL, _CHANNEL)
# Words of the kind image prompts are made of, a few of them not English or not Latin script.
_WORD_TEXT = """
a an the of in on with and at by from under over behind near wearing holding
portrait photo photograph painting illustration sketch render drawing poster still close-up
woman man girl boy child face eyes hands hair cat dog fox owl horse dragon robot knight
city street forest mountain ocean beach desert river lake castle house room kitchen garden
sky clouds sunset sunrise night rain snow fog storm fire smoke water light shadow reflection
red orange yellow green blue purple pink black white gold silver golden dark bright pale
old young ancient futuristic cyberpunk steampunk gothic baroque minimalist surreal cozy
cinematic dramatic soft volumetric studio natural neon rim backlit ambient moody vivid
lighting bokeh depth field lens wide angle macro telephoto aerial view shot frame
highly detailed intricate sharp focus masterpiece award-winning trending artstation unreal
engine octane hdr film grain analog polaroid kodak portra watercolor oil acrylic charcoal
anime manga pixel art isometric low poly vector flat 3d photorealistic hyperrealistic
"""
WORDS = (
    *_WORD_TEXT.split(),
    "Schnee",
    "雪",
    "🦊",
    "naïve",
    "ça",
    "café",
    "東京",
    "Москва",
    "ñandú",
    "façade",
    "Straße",
    "😀",
)
_SEPARATORS = (" ", " ", " ", ", ", ", ", ". ", "; ", ": ", " - ", " | ", "! ", "\n", " / ", " + ")
_CASES = ("lower", "title", "upper", "as-is")
_STYLES = ("plain", "weighted", "emphasis", "de-emphasis", "number", "quoted")
_NUMBERS = ("4k", "8K", "1024", "35mm", "50 mm", "f/1.8", "1.5", "2020s", "#1", "100%", "3:2", "-1", "0")


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator().manual_seed``."""
    return st.integers(0, 2**32 - 1)


def side_lengths(max_size: int = 256, multiple: int = FLUX_SIZE_MULTIPLE) -> st.SearchStrategy[int]:
    """Heights or widths FluxFillPipeline takes as they are: multiples of ``multiple`` up to ``max_size``.

    ``multiple`` is ``2 * pipe.vae_scale_factor``: 16 for Flux, smaller for tiny test models.
    """
    if max_size < multiple:
        raise ValueError(f"max_size {max_size} is below the smallest legal size, {multiple} pixels.")
    return st.integers(1, max_size // multiple).map(lambda count: count * multiple)


def sizes(max_size: int = 256, multiple: int = FLUX_SIZE_MULTIPLE) -> st.SearchStrategy[tuple[int, int]]:
    """(height, width) pairs, square or not."""
    return st.tuples(side_lengths(max_size, multiple), side_lengths(max_size, multiple))


def masks(height: int, width: int, outpainting: bool = True) -> st.SearchStrategy[Image.Image]:
    """Masks of one size: empty, full, rectangles, blobs, thin strokes, bands touching a border, and
    unless told otherwise outpainting masks (everything painted but a small rectangle)."""
    rows, columns = st.integers(0, height - 1), st.integers(0, width - 1)
    point = st.tuples(rows, columns)  # (row, column) inside the picture
    kinds = [
        st.builds(recipes.empty_mask, st.just(height), st.just(width)),
        st.builds(recipes.full_mask, st.just(height), st.just(width)),
        st.builds(
            recipes.rectangle_mask,
            height=st.just(height),
            width=st.just(width),
            top=rows,
            left=columns,
            rows=st.integers(1, height),
            columns=st.integers(1, width),
        ),
        st.builds(
            recipes.border_mask,
            height=st.just(height),
            width=st.just(width),
            side=st.sampled_from(recipes.BORDER_SIDES),
            thickness=st.integers(1, max(1, min(height, width) // 2)),
        ),
        st.builds(
            recipes.blob_mask,
            height=st.just(height),
            width=st.just(width),
            discs=st.lists(
                st.tuples(rows, columns, st.integers(0, max(height, width))), min_size=1, max_size=4
            ),
        ),
        st.builds(recipes.stroke_mask, height=st.just(height), width=st.just(width), start=point, end=point),
    ]
    if outpainting:
        kinds.append(
            st.builds(  # the kept region at most a quarter of each side: 94 % painted or more
                recipes.outpaint_mask,
                height=st.just(height),
                width=st.just(width),
                top=rows,
                left=columns,
                rows=st.integers(1, max(1, height // 4)),
                columns=st.integers(1, max(1, width // 4)),
            )
        )
    return st.one_of(kinds)


def images(height: int, width: int, overexposed: bool = True) -> st.SearchStrategy[Image.Image]:
    """RGB images of one size: noise, flat colours, gradients, saturated extremes and, unless told
    otherwise, overexposed photos (smooth content pushed past white and black by an exposure of 1 to 8)."""
    size = {"height": st.just(height), "width": st.just(width)}
    kinds = [
        st.builds(recipes.noise_image, **size, seed=seeds()),
        st.builds(recipes.flat_image, **size, colour=_COLOUR),
        st.builds(recipes.gradient_image, **size, start=_COLOUR, end=_COLOUR, vertical=st.booleans()),
        st.builds(recipes.extreme_image, **size, pattern=st.sampled_from(recipes.EXTREME_PATTERNS)),
    ]
    if overexposed:
        kinds.append(st.builds(recipes.exposed_image, **size, seed=seeds(), exposure=st.floats(1.0, 8.0)))
    return st.one_of(kinds)


def _styled(word: str, case: str, style: str, weight: float, number: str) -> str:
    word = {"lower": word.lower(), "title": word.title(), "upper": word.upper()}.get(case, word)
    if style == "weighted":  # the (word:1.3) syntax of A1111 and ComfyUI; diffusers reads it as text
        return f"({word}:{weight:g})"
    if style == "emphasis":
        return f"(({word}))"
    if style == "de-emphasis":
        return f"[{word}]"
    if style == "number":
        return f"{number} {word}"
    if style == "quoted":
        return f'"{word}"'
    return word


def _render(chunks: Sequence[tuple[str, str, str, float, str, str]]) -> str:
    return "".join(
        _styled(*chunk[:5]) + (chunk[5] if index < len(chunks) - 1 else "")
        for index, chunk in enumerate(chunks)
    )


def realistic_prompts(max_words: int = 120) -> st.SearchStrategy[str]:
    """Prompts as people write them: words from a built-in list, punctuation, ``(red:1.3)`` weights,
    emphasis brackets, numbers and casing; 1 to ``max_words`` words (CLIP reads about 75 tokens)."""
    chunk = st.tuples(
        st.sampled_from(WORDS),
        st.sampled_from(_CASES),
        st.sampled_from(_STYLES),
        st.integers(1, 20).map(lambda tenths: tenths / 10),
        st.sampled_from(_NUMBERS),
        st.sampled_from(_SEPARATORS),
    )
    return _long_lists(chunk, max_words).map(_render)


@st.composite
def _long_lists(draw: st.DrawFn, element: st.SearchStrategy, limit: int) -> list:
    """1 to ``limit`` elements, about 40 on average: drawn while a flag is non-zero, which shrinks well."""
    items = [draw(element)]
    while len(items) < limit and draw(st.integers(0, 255)) != 0:
        items.append(draw(element))
    return items


def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each ``weight`` times as likely; shrinks towards the first.

    ``st.one_of`` cannot weight: it draws its branches evenly and drops repeated ones.
    """
    indices = [index for index, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indices).flatmap(lambda index: choices[index][1])


_TOKENS_PER_DRAW = 4


@st.composite
def _token_ids(draw: st.DrawFn, ids: Sequence[int], limit: int) -> list[int]:
    """Up to ``limit`` ids, four slots at a time while hypothesis keeps drawing a non-zero flag.

    A slot is an index into ``ids`` or 0 for none. Shrinking empties slots (0) and drops groups, so
    a failure shrinks to the very tokens it needs; lists of fixed drawn length would shrink poorly,
    and hypothesis' own lists average a handful of elements where a window holds 77 or 512.
    """
    tokens: list[int] = []
    slot = st.integers(0, len(ids))
    while len(tokens) < limit and draw(st.integers(0, 255)) != 0:
        tokens += [ids[index - 1] for index in draw(st.tuples(*[slot] * _TOKENS_PER_DRAW)) if index]
    return tokens[:limit]


def _token_segment(vocabulary: Vocabulary, length: int) -> st.SearchStrategy[str]:
    """Up to ``length`` token ids of ``vocabulary`` decoded to text."""
    return _token_ids(vocabulary.ids, length).map(vocabulary.decode)


def token_prompts(vocabularies: Sequence[Vocabulary], overshoot: int = 16) -> st.SearchStrategy[str]:
    """Text decoded from token ids drawn from each vocabulary (``pipeline_vocabularies(pipe)``).

    One segment per vocabulary, in order: CLIP's fills its 77-token window, T5's then fills up to
    ``max_sequence_length`` and, with ``overshoot``, a few tokens past it. Every token a prompt can
    produce is reachable; a failure shrinks to the few tokens that matter.
    """
    segments = [
        _token_segment(vocabulary, vocabulary.limit + (overshoot if index == len(vocabularies) - 1 else 0))
        for index, vocabulary in enumerate(vocabularies)
        if vocabulary.ids
    ]
    if not segments:
        return st.just("")
    return st.tuples(*segments).map(lambda texts: " ".join(text for text in texts if text))


def prompts(
    max_sequence_length: int = 512, vocabularies: Sequence[Vocabulary] = ()
) -> st.SearchStrategy[str]:
    """Empty, realistic, any unicode, longer than ``max_sequence_length`` tokens, and, given the
    pipeline's ``vocabularies``, three times in five text decoded from token ids of its own tokenizers.

    Token prompts take the larger share: a tokenizer's vocabulary is far larger than what realistic
    words cover, and a token that overflows an encoder is found only by drawing it.
    """
    branches = [
        (1, st.just("")),
        (1, realistic_prompts()),
        (1, st.text(st.characters(codec="utf-8"), max_size=40)),
        (
            1,
            st.builds(
                recipes.repeated_words,
                word=st.sampled_from(WORDS),
                count=st.integers(max_sequence_length + 1, max_sequence_length + 16),
            ),
        ),
    ]
    if vocabularies:
        branches.append((6, token_prompts(vocabularies)))
    return _weighted(*branches)


def guidance_scales(
    max_guidance: float = 100.0, default: float = FLUX_FILL_GUIDANCE
) -> st.SearchStrategy[float]:
    """Guidance from 0 to ``max_guidance``, the pipeline's ``default`` (FluxFill's 30) included when in range.

    Above 65.5 every float16 Flux model with guidance embeddings overflows: FluxTransformer2DModel
    multiplies the guidance by 1000 in the working dtype, which passes 65504.
    """
    values = st.floats(0.0, max_guidance)
    return st.one_of(st.just(default), values) if max_guidance >= default else values


def lora_scales(max_scale: float = 1.5) -> st.SearchStrategy[float]:
    """LoRA scales (``joint_attention_kwargs={"scale": ...}``) from 0 to ``max_scale``, 1.0 included."""
    values = st.floats(0.0, max_scale)
    return st.one_of(st.just(1.0), values) if max_scale >= 1.0 else values


def inference_steps(max_steps: int = 4) -> st.SearchStrategy[int]:
    """Denoising steps from 1 to ``max_steps``."""
    return st.integers(1, max_steps)


def strengths() -> st.SearchStrategy[float]:
    """Strength from a faint touch-up to a full repaint (1.0, the default)."""
    return st.one_of(st.just(1.0), st.floats(MIN_STRENGTH, 1.0))


def images_per_prompt(max_images: int = 2) -> st.SearchStrategy[int]:
    """How many images one call returns."""
    return st.integers(1, max_images)


@st.composite
def _call_inputs(
    draw: st.DrawFn,
    takes: frozenset[str],
    default_guidance: float,
    max_size: int,
    multiple: int,
    max_steps: int,
    max_images: int,
    max_sequence_length: int,
    max_guidance: float,
    vocabularies: Sequence[Vocabulary],
    max_lora_scale: float | None,
) -> FillInputs:
    height, width = draw(sizes(max_size, multiple))
    return FillInputs(
        prompt=draw(prompts(max_sequence_length, vocabularies)),
        image=draw(images(height, width)) if "image" in takes else None,
        mask_image=draw(masks(height, width)) if "mask_image" in takes else None,
        height=height,
        width=width,
        guidance_scale=draw(guidance_scales(max_guidance, default_guidance)),
        num_inference_steps=draw(inference_steps(max_steps)),
        strength=draw(strengths()) if "strength" in takes else None,
        num_images_per_prompt=draw(images_per_prompt(max_images)),
        max_sequence_length=max_sequence_length if "max_sequence_length" in takes else None,
        seed=draw(seeds()),
        lora_scale=None if max_lora_scale is None else draw(lora_scales(max_lora_scale)),
        keep_size=True if "max_area" in takes else None,
    )


def call_inputs(
    shape: CallShape,
    max_size: int = 256,
    max_steps: int = 4,
    max_images: int = 2,
    max_sequence_length: int = 512,
    max_guidance: float = 100.0,
    vocabularies: Sequence[Vocabulary] = (),
    max_lora_scale: float | None = None,
) -> st.SearchStrategy[FillInputs]:
    """Whole calls of a pipeline of ``shape`` (``call_shape(pipe)``), sizes in its ``size_multiple``.

    ``image``, ``mask_image``, ``strength`` and ``max_sequence_length`` are drawn only where the call
    takes them; the pipeline's own default guidance_scale is drawn often.
    """
    side_lengths(max_size, shape.size_multiple)  # fail now, not at the first draw, on an impossible size
    return _call_inputs(
        shape.parameters,
        shape.default_guidance,
        max_size,
        shape.size_multiple,
        max_steps,
        max_images,
        max_sequence_length,
        max_guidance,
        tuple(vocabularies),
        max_lora_scale,
    )


def fill_inputs(
    max_size: int = 256,
    multiple: int = FLUX_SIZE_MULTIPLE,
    max_steps: int = 4,
    max_images: int = 2,
    max_sequence_length: int = 512,
    max_guidance: float = 100.0,
    vocabularies: Sequence[Vocabulary] = (),
    max_lora_scale: float | None = None,
) -> st.SearchStrategy[FillInputs]:
    """Whole FluxFillPipeline calls; pass ``example.pipeline_kwargs()`` to the pipeline.

    ``vocabularies=pipeline_vocabularies(pipe, max_sequence_length)`` adds prompts decoded from token
    ids of the pipeline's own tokenizers; ``max_lora_scale`` draws a LoRA scale per call.
    """
    shape = CallShape(FLUX_FILL_PARAMETERS, FLUX_FILL_GUIDANCE, multiple, embeds_guidance=True)
    return call_inputs(
        shape,
        max_size,
        max_steps,
        max_images,
        max_sequence_length,
        max_guidance,
        tuple(vocabularies),
        max_lora_scale,
    )
