"""Search power: examples until the first failure, the old search against the new, on tiny models
whose float16 overflow only some inputs trigger.

Run from the repository root:  python bench/search.py [--seeds 20] [--budgets 10,30] [--sites ...]
(the script puts its own folder on ``sys.path`` to import ``_common``).

Four input-triggered models (``guarded_diffusers.testing.TRIGGERED_SITES``), rebuilt for every seed
from that seed: ``t5_tokens`` and ``clip_tokens`` overflow in the encoder's first feed-forward only
for prompts holding one of three token ids drawn from that seed; ``mask_coverage`` in the VAE
encoder when the mask covers most but not all of the image; ``image_saturation`` in the VAE encoder's
first conv where a 3x3 patch is near white or black. Each is fuzzed as a raw float16 item is (the
plain pipeline behind a detect-only guard), with hypothesis seeded by the same seed, by three searches:

- ``old``: the plugin's search before this change: prompts empty, random unicode up to 40 characters
  or one of seven words repeated past the limit; no outpainting masks, no overexposed images; guidance
  capped at 65 (so the guidance x 1000 overflow does not mask the model's); untargeted. One image per
  call, as items now draw: a batch changes the cost of a call, not whether it overflows.
- ``untargeted``: the new strategies (prompts from the model's own tokenizers, realistic prompt text,
  outpainting masks, overexposed images), without ``hypothesis.target()``.
- ``new``: the plugin's search: the new strategies, each component's peak handed to ``target()``.

The figure is the number of examples run until the first failing one (``>budget``: not found), with
hypothesis' ``max_examples`` set to the budget. The budget changes the search itself: hypothesis
starts with ``budget // 10`` deliberately small examples, and its target phase only once
``max(budget // 2, 10)`` examples have run. So the criterion for the token-triggered models, found
within the plugin's default example count, is measured with a budget of 10, as a default item runs
(no target phase: ``untargeted`` would equal ``new`` and is skipped), and a budget of 30 shows what
the target phase adds from example 15 on. Sizes, steps and prompt lengths are the plugin's defaults
(64 px for the tiny models, 512 tokens) except ``--max-steps`` (1: the overflows all happen before
denoising, and a step costs time, not search power).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from guarded_diffusers.testing import (
    TRIGGERED_SITES,
    inject_token_overflow,
    inject_triggered_overflow,
    tiny_flux_fill_pipeline,
    trigger_token_ids,
)
from pytest_fluxguard import recipes
from pytest_fluxguard.checks import RawCheck
from pytest_fluxguard.failures import ExampleFailed
from pytest_fluxguard.inputs import FillInputs
from pytest_fluxguard.options import FluxGuardOptions
from pytest_fluxguard.pipelines import PipelineCache
from pytest_fluxguard.quiet import quiet_libraries
from pytest_fluxguard.search import DEFAULT_PATCHES, ITEM_IMAGES, item_strategy, target_peaks
from pytest_fluxguard.strategies import (
    FLUX_FILL_GUIDANCE,
    images,
    images_per_prompt,
    inference_steps,
    masks,
    seeds,
    sizes,
    strengths,
)
from pytest_fluxguard.summary import ItemStats
from pytest_fluxguard.target import Target

SEARCHES = ("old", "untargeted", "new")
DEFAULT_EXAMPLES = 10
MAX_SEQUENCE_LENGTH = 512
_OLD_WORDS = ("fox", "a", "Schnee", "雪", "🦊", "naïve", "ça")


# -- the search before this change, as it was ---------------------------------------------------------


def _old_prompts(max_sequence_length: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.builds(
            recipes.repeated_words,
            word=st.sampled_from(_OLD_WORDS),
            count=st.integers(max_sequence_length + 1, max_sequence_length + 16),
        ),
    )


@st.composite
def old_fill_inputs(draw: st.DrawFn, max_size: int, multiple: int, max_steps: int) -> FillInputs:
    height, width = draw(sizes(max_size, multiple))
    return FillInputs(
        prompt=draw(_old_prompts(MAX_SEQUENCE_LENGTH)),
        image=draw(images(height, width, overexposed=False)),
        mask_image=draw(masks(height, width, outpainting=False)),
        height=height,
        width=width,
        guidance_scale=draw(st.one_of(st.just(FLUX_FILL_GUIDANCE), st.floats(0.0, 65.0))),
        num_inference_steps=draw(inference_steps(max_steps)),
        strength=draw(strengths()),
        num_images_per_prompt=draw(images_per_prompt(ITEM_IMAGES)),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        seed=draw(seeds()),
    )


# -- one measurement ----------------------------------------------------------------------------------


def build_model(site: str, seed: int, folder: Path) -> str:
    """A tiny model from ``seed`` with ``site``'s trigger (token sites: three token ids from ``seed``)."""
    pipe = tiny_flux_fill_pipeline(seed)
    if site in ("t5_tokens", "clip_tokens"):
        encoder, tokenizer = ("t5", pipe.tokenizer_2) if site == "t5_tokens" else ("clip", pipe.tokenizer)
        module = inject_token_overflow(pipe, encoder, trigger_token_ids(tokenizer, seed=seed), seed=seed)
    else:
        module = inject_triggered_overflow(pipe, site)
    pipe.save_pretrained(folder)
    return module


def examples_until_failure(folder: Path, search: str, seed: int, budget: int, max_steps: int) -> int | None:
    """Examples run (target phase included) until the first failing one; None if none within ``budget``."""
    options = FluxGuardOptions(
        None, ("float16",), ("raw",), budget, None, max_steps, MAX_SEQUENCE_LENGTH, None, None, folder, "cpu"
    )
    item = Target(folder, None, "float16", "raw", reference_variant=None)
    cache = PipelineCache("cpu", capacity=1)
    check = RawCheck(item, options, cache, ItemStats())
    pipe = check.pipeline(guarded=False)
    if search == "old":
        multiple = 2 * pipe.vae_scale_factor
        strategy = old_fill_inputs(DEFAULT_PATCHES * multiple, multiple, max_steps)
    else:
        strategy = item_strategy(pipe, options, item)
    calls = [0]
    found: list[int] = []

    @settings(
        max_examples=budget,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.target],
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(example=strategy)
    def run(example: FillInputs) -> None:
        calls[0] += 1
        try:
            peaks = check(example)
        except ExampleFailed:
            if not found:
                found.append(calls[0])
            raise
        if search == "new":
            target_peaks(peaks)

    with contextlib.suppress(ExampleFailed):
        hypothesis_seed(seed)(run)()
    return found[0] if found else None


# -- the table ----------------------------------------------------------------------------------------


def _shown(value: float | None, budget: int) -> str:
    return f">{budget}" if value is None else f"{value:g}"


def summarise(results: dict[str, dict[str, list[int | None]]], budget: int) -> list[str]:
    header = f"{'site':18}{'search':12}{'found<=10':>10}{f'found<={budget}':>11}{'median':>8}{'worst':>7}"
    lines = [f"{header}  per seed"]
    for site, by_search in results.items():
        for search, counts in by_search.items():
            ordered = sorted(counts, key=lambda count: budget + 1 if count is None else count)
            median = ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else None
            if len(ordered) % 2 == 0:
                low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
                median = None if high is None else statistics.mean([low, high])  # type: ignore[list-item]
            within = sum(count is not None and count <= DEFAULT_EXAMPLES for count in counts)
            found = sum(count is not None for count in counts)
            per_seed = " ".join(_shown(count, budget) for count in counts)
            lines.append(
                f"{site:18}{search:12}{f'{within}/{len(counts)}':>10}{f'{found}/{len(counts)}':>11}"
                f"{_shown(median, budget):>8}{_shown(ordered[-1], budget):>7}  {per_seed}"
            )
    return lines


def _targeting_starts(budget: int) -> bool:
    """Whether hypothesis runs a target phase within ``budget`` examples (engine: max(budget // 2, 10))."""
    return max(budget // 2, 10) < budget


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budgets", default="10,30", help="examples per search and seed (default 10,30)")
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--sites", default=",".join(TRIGGERED_SITES))
    parser.add_argument("--searches", default=",".join(SEARCHES))
    parser.add_argument("--json", type=Path, help="also write the per-seed counts here")
    arguments = parser.parse_args()
    _common.quiet()
    sites, budgets = arguments.sites.split(","), [int(budget) for budget in arguments.budgets.split(",")]
    print(_common.machine_summary())
    results: dict[int, dict[str, dict[str, list[int | None]]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, quiet_libraries():
        for site in sites:
            for seed in range(arguments.seeds):
                folder = Path(root) / f"{site}-{seed}"
                build_model(site, seed, folder)
                for budget in budgets:
                    searches = [
                        search
                        for search in arguments.searches.split(",")
                        if search != "untargeted" or _targeting_starts(budget)
                    ]
                    for search in searches:
                        count = examples_until_failure(folder, search, seed, budget, arguments.max_steps)
                        results.setdefault(budget, {}).setdefault(site, {}).setdefault(search, []).append(
                            count
                        )
                        print(
                            f"{site} seed {seed} budget {budget} {search}: {_shown(count, budget)}",
                            flush=True,
                        )
    print(f"\n{arguments.seeds} seeds, {time.perf_counter() - started:.0f} s")
    for budget, by_site in results.items():
        print(f"\nbudget {budget} examples (max_examples={budget}):")
        for line in summarise(by_site, budget):
            print(line)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
