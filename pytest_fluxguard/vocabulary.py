"""What a text encoder can see: the token ids a prompt can produce, and text that produces them.

The prompt strategy draws sequences of token ids from each of the pipeline's tokenizers and decodes
them to text, so every token the model can see is reachable by the search, not only the ones that
common words produce. A token is reachable when tokenizing the decoded ``[t, t]`` gives ``t`` back:
a lowercasing tokenizer (CLIP's) cannot produce an upper-case token from text, a byte-level one
cannot produce a lone UTF-8 continuation byte. Drawing only reachable ids keeps every draw useful.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

# CLIP reads at most this many tokens (its position embeddings), whatever max_sequence_length says.
CLIP_TOKENS = 77


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """One tokenizer's reachable token ids, how many tokens its encoder reads, and its decoder."""

    name: str
    ids: tuple[int, ...]
    limit: int
    tokenizer: Any = dataclasses.field(repr=False, compare=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


_REACHABLE: dict[int, tuple[Any, tuple[int, ...]]] = {}


def reachable_ids(tokenizer: Any) -> tuple[int, ...]:
    """``guarded_diffusers.testing.reachable_token_ids``, computed once per tokenizer object."""
    held = _REACHABLE.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        from guarded_diffusers.testing import reachable_token_ids

        held = _REACHABLE[id(tokenizer)] = (tokenizer, reachable_token_ids(tokenizer))
    return held[1]


def pipeline_vocabularies(pipe: Any, max_sequence_length: int) -> tuple[Vocabulary, ...]:
    """The vocabularies of a pipeline's tokenizers, CLIP's (``tokenizer``) first.

    CLIP reads its first 77 tokens, the others (Flux's T5 ``tokenizer_2``, SDXL's second CLIP, SD3's
    T5 ``tokenizer_3``) at most ``max_sequence_length`` and their ``model_max_length``: a drawn
    prompt fills CLIP's window first, then the next tokenizer's.
    """
    vocabularies = []
    for name, limit in (
        ("tokenizer", CLIP_TOKENS),
        ("tokenizer_2", max_sequence_length),
        ("tokenizer_3", max_sequence_length),
    ):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            limit = min(limit, getattr(tokenizer, "model_max_length", limit) or limit)
            vocabularies.append(Vocabulary(name, reachable_ids(tokenizer), limit, tokenizer))
    return tuple(vocabularies)
