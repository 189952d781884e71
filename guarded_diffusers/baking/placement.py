"""Where a cut's factor sits: at the layers that write the cut, or one layer earlier.

Attention is linear in V, so ``to_out(attention(q, k, v * c))`` is ``to_out(attention(q, k, v))``
with ``to_out``'s weight times ``c``: the factor a cut needs from its output projections can sit in
the V projections instead (their weights and biases take ``2**-k``, the output projection keeps its
weight and only its bias takes ``2**-k``). The tracer finds such places without knowing attention: a
class no normalisation reads and nothing pins, written by layers and read only by layers that all
write one scaled cut (Flux's double blocks, T5, CLIP and the VAEs' attention V paths). Which
placement rounds less in float16 depends on the weights (which values fall into subnormals, how the
intermediate rounds), so the bake measures both and keeps the better (``run.bake``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .choose import Choice
from .cuts import Cut

WRITERS = "writers"
VALUES = "values"


def upstream_choices(
    cuts: Sequence[Cut], layers: dict[str, tuple[int | None, int | None]], choices: Sequence[Choice]
) -> list[Choice]:
    """A choice for each class that can take, one layer earlier, the ``k`` of the one scaled cut its
    readers write; with these added to ``choices``, those readers' weights keep their values."""
    k_of = {choice.cut.index: choice.k for choice in choices if choice.k}
    moved = []
    for cut in cuts:
        if cut.readers or cut.pinned is not None or not cut.writers or not cut.passers:
            continue
        written = {layers[reader][1] for reader in cut.passers}
        if len(written) == 1 and (k := k_of.get(written.pop(), 0)):
            moved.append(Choice(cut, k, k))
    return moved
