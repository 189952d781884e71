"""The pytest11 plugin end to end: pytester sessions against tiny models saved to temp folders."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # hypothesis depends on the backport there
    from exceptiongroup import ExceptionGroup

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from hypothesis import HealthCheck, given, settings

from guarded_diffusers import GuardReport, Incident, NonFiniteError
from guarded_diffusers.testing import (
    FAMILIES,
    SILENTLY_CLIPPED_SITES,
    TRIGGERED_SITES,
    inject_overflow,
    inject_triggered_overflow,
    save_tiny_pipeline,
    tiny_flux_fill_pipeline,
    trigger_token_ids,
)
from pytest_fluxguard import recipes
from pytest_fluxguard.budget import BudgetSpent, ShrinkBudget
from pytest_fluxguard.calls import call_shape
from pytest_fluxguard.checks import GuardedCheck, _how_far
from pytest_fluxguard.failures import ExampleFailed, failure_class
from pytest_fluxguard.fuzz import _example_failures
from pytest_fluxguard.inputs import FillInputs
from pytest_fluxguard.model_folder import weight_variants
from pytest_fluxguard.options import FluxGuardOptions
from pytest_fluxguard.peaks import COMPONENTS, PeakMeter
from pytest_fluxguard.pipelines import PipelineCache
from pytest_fluxguard.search import guidance_limit, item_max_guidance
from pytest_fluxguard.strategies import call_inputs, fill_inputs
from pytest_fluxguard.summary import ItemStats
from pytest_fluxguard.target import Target

peft = pytest.importorskip("peft")

pytest_plugins = ["pytester"]

# Small and short: the tiny model's legal sizes are multiples of 4, so 4 to 16 pixels.
FAST = [
    "--fluxguard-examples=2",
    "--fluxguard-max-size=16",
    "--fluxguard-max-steps=2",
    "--fluxguard-max-sequence-length=16",
    "-p",
    "no:cacheprovider",
]
OVERFLOWING_MODULE = "transformer.single_transformer_blocks.0.proj_mlp"
CLIPPED_SITE = "single_block_proj_out"
CLIPPED_MODULE = "transformer.single_transformer_blocks.0.proj_out"
UNET_MODULE = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
# A profile without hypothesis' shrink phase, for items whose every example fails the same way:
# the first failure is as good as the minimal one, and shrinking a float16 model on CPU takes minutes.
NO_SHRINK = (
    "from hypothesis import Phase, settings\n"
    "settings.register_profile('no-shrink', phases=[Phase.explicit, Phase.reuse, Phase.generate])\n"
)
MAX_FAILURE_LINES = 60  # a failing item's whole section: message, guard report, PNGs, the example
# What a failing item's output must never hold: library logging, loader and truncation notes, tqdm.
NOISE = ("Captured", "truncated", "WARNING", "Loading", "it/s]", "%|", "\r", "torchao", "Hypothesis")
LIMITATION = "known pipeline limitation (not the model's): raw items drew guidance_scale up to 65.5, not 100."


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default weights and an fp16 variant in one folder, as a model repo ships them."""
    folder = tmp_path_factory.mktemp("clean-model")
    pipe = tiny_flux_fill_pipeline(seed=1)
    pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, variant="fp16")
    return folder


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("overflowing-model")
    assert save_tiny_pipeline(folder, "single_block_mlp") == OVERFLOWING_MODULE
    return folder


@pytest.fixture(scope="module")
def clipped_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain float16 clips its residual stream at 65504: finite pixels, silently wrong."""
    assert CLIPPED_SITE in SILENTLY_CLIPPED_SITES
    folder = tmp_path_factory.mktemp("clipped-model")
    assert save_tiny_pipeline(folder, CLIPPED_SITE) == CLIPPED_MODULE
    return folder


@pytest.fixture
def keeps_hypothesis_profile():
    """pytester runs in this process, where --hypothesis-profile loads a profile for good: put ours back."""
    name = settings.get_current_profile_name()
    yield
    settings.load_profile(name)


def failure_section(output: str, title: str) -> list[str]:
    """The lines of one item's failure, captured output included, up to the next section."""
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("_") and f" {title} " in line)
    end = next(
        (index for index, line in enumerate(lines[start + 1 :], start + 1) if line[:3] in ("___", "===")),
        len(lines),
    )
    return lines[start:end]


def assert_short_and_quiet(section: list[str]) -> None:
    """A failing item's section fits a screen and holds none of the libraries' noise."""
    assert len(section) <= MAX_FAILURE_LINES, "\n".join(section)
    noisy = [line for line in section if any(word in line for word in NOISE)]
    assert not noisy, noisy


def test_importing_the_plugin_loads_neither_torch_nor_diffusers():
    heavy = ("torch", "diffusers", "transformers", "hypothesis", "numpy")
    probe = f"import sys, pytest_fluxguard.plugin; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_help_lists_the_options_and_ini_twins_in_their_own_group(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "fluxguard: fuzz a diffusers model for non-finite pixels:",
            "*--fluxguard-model=PATH*",
            "*--fluxguard-min-psnr=DB*",
            "*fluxguard_model (string)*",
        ]
    )


def test_a_bad_option_value_is_a_usage_error_naming_the_option(pytester):
    result = pytester.runpytest("--fluxguard-dtype=float16,float8")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--fluxguard-dtype got 'float16,float8'; expected a comma-separated list of*"]
    )


def test_ini_twins_select_the_model_relative_to_the_ini_file_and_name_the_items(pytester, clean_model):
    shutil.copytree(clean_model, pytester.path / "model")
    pytester.makeini("[pytest]\nfluxguard_model = model\nfluxguard_dtype = bfloat16\nfluxguard_mode = raw\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        ["model::weights/bfloat16/raw", "model::fp16-weights/bfloat16/raw", "2 tests collected*"]
    )


def test_the_fluxguard_hypothesis_profile_can_be_loaded_by_name(pytester):
    result = pytester.runpytest("--hypothesis-profile=fluxguard", "--collect-only", "-v")
    result.stdout.fnmatch_lines(["hypothesis profile 'fluxguard' -> *deadline=None*"])


def test_variants_are_read_from_weight_file_names(clean_model, overflowing_model, tmp_path):
    tiny_flux_fill_pipeline().save_pretrained(tmp_path, variant="fp16")
    assert weight_variants(clean_model) == [None, "fp16"]
    assert weight_variants(overflowing_model) == [None]
    assert weight_variants(tmp_path) == ["fp16"]


@pytest.mark.parametrize(
    ("index", "reason"),
    [
        ('{"unet": ["diffusers", "UNet2DConditionModel"]}', "*model_index.json names None, not a diffusers*"),
        ('{"_class_name": "FluxPipeline"}', "*has no weight files (*) in its components."),
        (None, "*has no model_index.json, so it is not a diffusers pipeline."),
    ],
)
def test_a_folder_that_is_not_a_pipeline_is_one_collection_error(pytester, index, reason):
    folder = pytester.mkdir("not-a-pipeline")
    if index is not None:
        (folder / "model_index.json").write_text(index)
    result = pytester.runpytest(f"--fluxguard-model={folder}", *FAST)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting not-a-pipeline*", f"--fluxguard-model: {reason}"])


def test_clean_model_passes_every_default_item_of_every_variant(pytester, clean_model):
    # No --fluxguard-max-guidance: raw float16 items keep within what diffusers carries (guidance x 1000).
    result = pytester.runpytest(f"--fluxguard-model={clean_model}", "-v", *FAST)
    result.assert_outcomes(passed=8)
    name = clean_model.name
    items = [
        f"{variant}/{dtype}/{mode}"
        for variant in ("weights", "fp16-weights")
        for dtype in ("float16", "bfloat16")
        for mode in ("raw", "guarded")
    ]
    result.stdout.fnmatch_lines_random([f"{name}::{item} PASSED*" for item in items])
    result.stdout.fnmatch_lines(
        ["*= fluxguard summary =*", "item * examples  failures  recovered  peak * first offending module"]
    )
    result.stdout.fnmatch_lines_random(
        [f"{name}::{item} * 2 * 0 * 0 * -" for item in items if "guarded" not in item]
    )
    # The pipeline's own guidance limit is said once, as what it is, not counted against the model.
    assert result.stdout.str().count(LIMITATION) == 1


def test_a_clean_model_passes_every_default_item_with_ten_hypothesis_seeds(
    pytester, tmp_path_factory, keeps_hypothesis_seed
):
    """Green by default: guidance, prompts and pictures drawn with defaults never fail a clean model.

    Default dtypes, modes, guidance and prompt strategies; the smallest pictures, one step and short
    prompts only to keep ten runs short: what fails a clean model by default is the guidance.
    """
    folder = tmp_path_factory.mktemp("clean-default-weights")
    tiny_flux_fill_pipeline(seed=2).save_pretrained(folder)
    small = ["--fluxguard-max-size=4", "--fluxguard-max-steps=1", "--fluxguard-max-sequence-length=8"]
    for seed in range(10):
        result = pytester.runpytest(
            f"--fluxguard-model={folder}", f"--hypothesis-seed={seed}", "--fluxguard-examples=4", *small
        )
        assert result.ret == pytest.ExitCode.OK, f"seed {seed}:\n{result.stdout.str()}"
        result.assert_outcomes(passed=4)


@pytest.mark.parametrize(
    ("dtype", "mode", "given", "expected"),
    [
        ("float16", "raw", None, (65.504, 65.504)),
        ("bfloat16", "raw", None, (100.0, None)),
        ("float16", "guarded", None, (100.0, None)),
        ("float16", "raw", 100.0, (100.0, None)),  # an explicit option applies to every item
        ("float16", "guarded", 20.0, (20.0, None)),
    ],
)
def test_raw_items_draw_guidance_only_within_what_the_dtype_carries(dtype, mode, given, expected):
    options = _options(max_guidance=given)
    target = Target(Path("m"), None, dtype, mode, None)
    assert item_max_guidance(options, target, embeds_guidance=True) == pytest.approx(expected)
    assert guidance_limit("float16") == torch.finfo(torch.float16).max / 1000


def test_the_guidance_limit_itself_passes_plain_float16_and_just_above_it_does_not(raw_and_detecting):
    _, detecting = raw_and_detecting
    detecting(**_fill_example(guidance=guidance_limit("float16")).pipeline_kwargs(), output_type="np")
    with pytest.raises(NonFiniteError, match="time_proj"):
        detecting(**_fill_example(guidance=65.6).pipeline_kwargs(), output_type="np")


@settings(max_examples=4, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(example=fill_inputs(max_size=16, multiple=4, max_steps=2, max_sequence_length=16, max_guidance=65.0))
def test_the_detect_only_pipeline_gives_the_raw_pixels_bit_for_bit(clean_model, raw_and_detecting, example):
    raw, detecting = raw_and_detecting
    expected = raw(**example.pipeline_kwargs(), output_type="np").images
    output = detecting(**example.pipeline_kwargs(), output_type="np")
    assert not output.guard_report.incidents
    np.testing.assert_array_equal(output.images, expected)


@pytest.fixture(scope="module")
def raw_and_detecting(clean_model):
    cache = PipelineCache("cpu")
    raw, detecting = cache.get(clean_model), cache.detecting(clean_model)
    assert detecting.guard.strategies == []  # detects only: raises at the first overflow
    assert all(detecting.components[name] is module for name, module in raw.components.items())
    return raw, detecting


def test_a_silently_clipped_model_fails_raw_float16_naming_the_saturated_module(
    pytester, clipped_model, keeps_hypothesis_profile
):
    pytester.makeconftest(NO_SHRINK)
    result = pytester.runpytest(
        f"--fluxguard-model={clipped_model}",
        "--fluxguard-dtype=float16,bfloat16",
        "--fluxguard-mode=raw",
        "--hypothesis-profile=no-shrink",
        *FAST,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ fluxguard weights/float16/raw _*",
            f"weights/float16/raw: silently clipped at denoise step 0 in {CLIPPED_MODULE}: float32 peak "
            "1.2e+05 = 1.8x float16's max 65504; diffusers clipped the values there to fit float16, so the "
            "image is finite but silently wrong",
            "the same example through GuardedFluxFillPipeline:",
            f"  non-finite output at denoise step 0 in {CLIPPED_MODULE} (float32 absmax 1.2e+05); recovered*",
            "saved:",
            "*output-0.png",
        ]
    )
    section = failure_section(result.stdout.str(), "weights/float16/raw")
    assert_short_and_quiet(section)
    name = clipped_model.name
    result.stdout.fnmatch_lines_random(
        [
            f"{name}::weights/float16/raw * {CLIPPED_MODULE}",
            f"{name}::weights/bfloat16/raw * 2 * 0 * 0 * -",
        ]
    )


def _fill_example(size: int = 4, guidance: float = 30.0, prompt: str = "") -> FillInputs:
    return FillInputs(
        prompt=prompt,
        image=recipes.noise_image(height=size, width=size, seed=0),
        mask_image=recipes.full_mask(height=size, width=size),
        height=size,
        width=size,
        guidance_scale=guidance,
        num_inference_steps=1,
        strength=1.0,
        num_images_per_prompt=1,
        max_sequence_length=16,
        seed=0,
    )


class _ReportingPipelines:
    """A PipelineCache whose guarded pipeline returns black-free pixels and a given report."""

    def __init__(self, report: GuardReport) -> None:
        self.report = report

    def get(self, path, variant=None, dtype="float16", guarded=False, lora=None):
        report = self.report

        class Pipeline:
            guard = type("Guard", (), {"reset": staticmethod(lambda: None)})

            def __call__(self, **kwargs):
                return type("Output", (), {"images": np.zeros((1, 4, 4, 3)), "guard_report": report})

        return Pipeline()


def _options(**overrides) -> FluxGuardOptions:
    fields = {
        "model": None,
        "dtypes": ("float16",),
        "modes": ("guarded",),
        "examples": 1,
        "max_size": 16,
        "max_steps": 1,
        "max_sequence_length": 16,
        "max_guidance": 65.0,
        "min_psnr": None,
        "artifacts": Path(".fluxguard"),
        "device": "cpu",
    }
    return FluxGuardOptions(**{**fields, **overrides})


def _guarded_check(report: GuardReport) -> GuardedCheck:
    target = Target(Path("model"), None, "float16", "guarded", reference_variant=None)
    return GuardedCheck(target, _options(), _ReportingPipelines(report), ItemStats())


def test_a_degraded_fix_fails_a_guarded_example_with_its_own_message():
    where = "transformer.single_transformer_blocks.1.proj_out"
    detail = "error 0.16 against float32 exceeds the tolerance 0.0039"
    recovered = Incident("denoise", 0, CLIPPED_MODULE, 1.2e5, strategy="residual", recovered=True)
    degraded = Incident(
        "denoise", 0, where, 1.2e5, strategy="residual", fixed_module=where, degraded=True, detail=detail
    )
    _guarded_check(GuardReport([recovered]))(_fill_example())  # recovered within tolerance: passes

    with pytest.raises(ExampleFailed) as failure:
        _guarded_check(GuardReport([recovered, degraded]))(_fill_example())

    assert failure.value.problem == (
        f"degraded at denoise step 0 in {where}: the guard kept residual on {where}, its most faithful "
        f"finite fix, but {detail}; the image is finite and may be far from float32's"
    )


@pytest.mark.parametrize(
    ("absmax", "dtype", "expected"),
    [
        (120000.0, "float16", "float32 peak 1.2e+05 = 1.8x float16's max 65504"),
        (64800.0, "float16", "float32 peak 6.48e+04, within 1000 of float16's max 65504"),
        (None, "float16", "past float16's max 65504 (float32 peak not measured)"),
        (float("inf"), "bfloat16", "float32 peak inf (it overflows float32 too)"),
    ],
)
def test_how_far_past_the_dtype_says_peak_and_ratio(absmax, dtype, expected):
    assert _how_far(Incident("denoise", 0, CLIPPED_MODULE, absmax), dtype) == expected


def test_distinct_failures_from_hypothesis_are_all_explained_and_anything_else_is_not():
    first, second = ExampleFailed("one", None), ExampleFailed("two", None)
    assert _example_failures(first) == [first]
    assert _example_failures(ExceptionGroup("two bugs", [first, ExceptionGroup("nested", [second])])) == [
        first,
        second,
    ]
    assert _example_failures(ExceptionGroup("a crash too", [first, ValueError("boom")])) is None


def test_overflowing_model_fails_raw_float16_naming_the_module_and_passes_guarded(
    pytester, overflowing_model, keeps_hypothesis_profile
):
    # Every example overflows at the same module: shrinking would only cost minutes on CPU.
    pytester.makeconftest(NO_SHRINK)
    result = pytester.runpytest(
        f"--fluxguard-model={overflowing_model}",
        "--fluxguard-dtype=float16,bfloat16",
        "--fluxguard-min-psnr=20",
        "--hypothesis-profile=no-shrink",
        *FAST,
    )
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ fluxguard weights/float16/raw _*",
            "weights/float16/raw: * pixel values are non-finite*",
            f"first module to go non-finite: {OVERFLOWING_MODULE}",
            "the same example through GuardedFluxFillPipeline:",
            f"  non-finite output at denoise step 0 in {OVERFLOWING_MODULE}*",
            "saved:",
            "*output-0.png",
            "*mask.png",
            "*image.png",
            "shrunk example (replay: pipe(**example.pipeline_kwargs(), output_type='np')):",
            "FillInputs(",
            "    mask_image=*_mask(height=*",
        ]
    )
    # A set: with CI set, pytest repeats the whole message in its short summary.
    saved = set(re.findall(r"^  (/\S+\.png)$", result.stdout.str(), flags=re.MULTILINE))
    assert {Path(path).name for path in saved} >= {"output-0.png", "mask.png", "image.png"}
    assert all(Path(path).is_file() for path in saved)  # one output PNG per image of the call
    section = failure_section(result.stdout.str(), "weights/float16/raw")
    assert_short_and_quiet(section)
    name = overflowing_model.name
    result.stdout.fnmatch_lines_random(
        [
            f"{name}::weights/float16/raw * {OVERFLOWING_MODULE}",
            f"{name}::weights/float16/guarded * 2 * 0 * {OVERFLOWING_MODULE}",  # an example may recover twice
            f"{name}::weights/bfloat16/raw * 2 * 0 * 0 * -",
        ]
    )


def test_summary_reaches_the_controller_under_xdist(pytester, overflowing_model):
    # Guarded items only: no failure to shrink, so the run costs little more than starting two workers.
    result = pytester.runpytest(
        "-n", "2", f"--fluxguard-model={overflowing_model}", "--fluxguard-mode=guarded", *FAST
    )
    result.assert_outcomes(passed=2)
    name = overflowing_model.name
    result.stdout.fnmatch_lines_random(
        [
            "*= fluxguard summary =*",
            f"{name}::weights/float16/guarded * 2 * 0 * {OVERFLOWING_MODULE}",
            f"{name}::weights/bfloat16/guarded * 2 * 0 * 0 * -",
        ]
    )


def test_hand_written_tests_use_the_fixture_marker_and_strategies(pytester, overflowing_model):
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import pytest
            from hypothesis import given

            from pytest_fluxguard import NonFinitePixels, assert_finite_pixels
            from pytest_fluxguard.strategies import call_inputs, fill_inputs

            MODEL = {str(overflowing_model)!r}
            DTYPES_RUN = []
            SMALL = fill_inputs(max_size=8, multiple=4, max_steps=1, max_images=1, max_sequence_length=16)


            @pytest.mark.fluxguard(examples=3, dtypes=["float16"])
            @given(example=SMALL)
            def test_guarded_is_finite(fluxguard_pipeline, fluxguard_dtype, example):
                DTYPES_RUN.append(fluxguard_dtype)
                pipe = fluxguard_pipeline(MODEL, dtype=fluxguard_dtype, guarded=True)
                output = pipe(**example.pipeline_kwargs(), output_type="np")
                assert_finite_pixels(output.images, output.guard_report)


            def test_the_marker_set_examples_and_dtypes():
                assert DTYPES_RUN == ["float16"] * 3


            # Same cached weights as the guarded test, whose last call left its fix applied:
            # non-finite again only if the fixture handed the raw pipeline out with fixes undone.
            @pytest.mark.fluxguard(examples=1)
            @given(example=SMALL)
            def test_raw_float16_is_not_finite(fluxguard_pipeline, example):
                pipe = fluxguard_pipeline(MODEL, dtype="float16")
                output = pipe(**example.pipeline_kwargs(), output_type="np")
                with pytest.raises(NonFinitePixels, match="pixel values are non-finite"):
                    assert_finite_pixels(output.images)
            """
        ),
    )
    pytester.makepyfile(
        test_misspelt="import pytest\n\n@pytest.mark.fluxguard(example=3)\ndef test_misspelt():\n    pass\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--continue-on-collection-errors")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_guarded_is_finite[[]float16[]] PASSED*",
            "*fluxguard takes only the keywords examples, dtypes*",
        ]
    )


# -- search power: prompts from the model's own tokenizers, targeted, one failure per module ------------


def test_each_offending_module_is_its_own_failure_class_so_hypothesis_keeps_them_apart():
    t5, vae = failure_class("overflow", "text_encoder_2.x"), failure_class("overflow", "vae.encoder.conv_in")
    assert t5 is failure_class("overflow", "text_encoder_2.x") and t5 is not vae
    assert issubclass(t5, ExampleFailed) and issubclass(vae, ExampleFailed)
    assert failure_class("degraded", "vae.encoder.conv_in") is not vae


def test_the_peak_meter_reads_every_component_once_per_example(clean_model):
    pipe = PipelineCache("cpu").get(clean_model, dtype="float16")
    meter = PeakMeter()
    reads = []
    original = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        reads.append(self.shape)
        return original(self, *args, **kwargs)

    with meter.measuring(pipe):
        pipe(**_fill_example(size=8).pipeline_kwargs(), output_type="np")
    torch.Tensor.tolist = counted
    try:
        peaks = meter.read()
    finally:
        torch.Tensor.tolist = original
    assert set(peaks) == set(COMPONENTS) - {"text_encoder_3", "unet"} and len(reads) == 1  # Flux has none
    assert all(0.0 < ratio < 1.0 for ratio in peaks.values())  # over float16's maximum
    assert not any(
        module._forward_hooks or module._forward_pre_hooks for module in pipe.transformer.modules()
    )


@pytest.fixture(scope="module")
def triggered_pipelines(tmp_path_factory: pytest.TempPathFactory):
    """``triggered_pipelines(site)`` -> {dtype name: detect-only pipeline}; each model saved once."""
    cache = PipelineCache("cpu", capacity=3)
    folders = {}

    def get(site):
        if site not in folders:
            folders[site] = tmp_path_factory.mktemp(site)
            pipe = tiny_flux_fill_pipeline(seed=0)
            inject_triggered_overflow(pipe, site)
            pipe.save_pretrained(folders[site])
        return {
            dtype: cache.detecting(folders[site], dtype=dtype) for dtype in ("float32", "bfloat16", "float16")
        }

    return get


@pytest.fixture
def keeps_hypothesis_seed():
    """pytester runs in this process, where --hypothesis-seed forces the seed of every later test: undo it."""
    from hypothesis import core

    seed = core.global_force_seed
    yield
    core.global_force_seed = seed


def _trigger_text(site: str) -> str:
    pipe = tiny_flux_fill_pipeline(seed=0)
    if site == "t5_tokens":
        return pipe.tokenizer_2.decode(trigger_token_ids(pipe.tokenizer_2)[:1])
    token = trigger_token_ids(pipe.tokenizer)[0]
    return pipe.tokenizer.decode([token, token])


def _triggering(site: str, size: int = 16) -> FillInputs:
    """An example that sets ``site`` off; ``_quiet_example`` is the same call that does not."""
    example = _quiet_example(size)
    if site in ("t5_tokens", "clip_tokens"):
        return dataclasses.replace(example, prompt=f"a red cat {_trigger_text(site)} on the moon")
    if site == "mask_coverage":
        mask = recipes.outpaint_mask(height=size, width=size, top=4, left=4, rows=1, columns=2)
        return dataclasses.replace(
            example, image=recipes.flat_image(size, size, (200, 40, 90)), mask_image=mask
        )
    return dataclasses.replace(example, image=recipes.extreme_image(height=size, width=size, pattern="white"))


def _quiet_example(size: int = 16) -> FillInputs:
    return dataclasses.replace(
        _fill_example(size, prompt="a red cat on the moon"),  # none of the trigger tokens
        image=recipes.noise_image(height=size, width=size, seed=1),
        mask_image=recipes.rectangle_mask(height=size, width=size, top=4, left=4, rows=8, columns=8),
    )


@pytest.mark.parametrize("site", list(TRIGGERED_SITES))
def test_a_triggered_model_overflows_float16_only_for_its_trigger(triggered_pipelines, site):
    pipes = triggered_pipelines(site)
    for dtype, pipe in pipes.items():
        pipe(**_quiet_example().pipeline_kwargs(), output_type="np")
        if dtype != "float16":
            pipe(**_triggering(site).pipeline_kwargs(), output_type="np")
    with pytest.raises(NonFiniteError) as error:
        pipes["float16"](**_triggering(site).pipeline_kwargs(), output_type="np")
    module = inject_triggered_overflow(tiny_flux_fill_pipeline(), site)
    assert error.value.report.incidents[0].module == module


@pytest.mark.parametrize("encoder", ["tokenizer", "tokenizer_2"])
def test_prompts_reach_a_few_trigger_tokens_within_the_default_examples_for_most_seeds(encoder):
    """The prompt strategy alone, as a raw item draws it (10 examples, hypothesis seeds 0 to 19): the
    first example holding one of three token ids drawn from the seed. bench/search.py measures the
    same on the models themselves."""
    from hypothesis import Phase
    from hypothesis import seed as hypothesis_seed

    from pytest_fluxguard.vocabulary import pipeline_vocabularies

    pipe = tiny_flux_fill_pipeline()
    tokenizer = getattr(pipe, encoder)
    window = 75 if encoder == "tokenizer" else 512  # what CLIP and T5 read of a prompt
    strategy = fill_inputs(max_size=16, multiple=4, vocabularies=pipeline_vocabularies(pipe, 512))
    hits: list[bool] = []
    triggers: set[int] = set()

    @settings(max_examples=10, database=None, deadline=None, phases=[Phase.generate])
    @given(example=strategy)
    def draw(example):
        ids = tokenizer(example.prompt, add_special_tokens=False).input_ids[:window]
        hits.append(bool(triggers & set(ids)))

    found = 0
    for seed in range(20):
        hits.clear()
        triggers.clear()
        triggers.update(trigger_token_ids(tokenizer, seed=seed))
        hypothesis_seed(seed)(draw)()
        found += any(hits)
    assert found >= 18


def test_the_shrink_budget_grants_calls_per_distinct_failure_and_keeps_the_shortest_example():
    budget = ShrinkBudget(calls=2)
    long, short = _fill_example(prompt="a long prompt"), _fill_example(prompt="a")
    t5, vae = failure_class("overflow", "text_encoder_2.x"), failure_class("overflow", "vae.encoder.x")
    budget.spend()  # before any failure, calls are free
    budget.failed(long, t5("t5", long))
    for _ in range(2):
        budget.spend()
    with pytest.raises(BudgetSpent):
        budget.spend()
    budget.failed(short, t5("t5", short))  # the same kind again: no more calls, a shorter example
    budget.failed(long, vae("vae", long))  # a new kind: two more calls
    budget.spend()
    assert budget.known(short).example is short
    assert [(type(f), f.example) for f in budget.smallest()] == [(t5, short), (vae, long)]
    with pytest.raises(BudgetSpent):
        budget.spend()


@pytest.fixture(scope="module")
def two_modules(tmp_path_factory) -> tuple[Path, str, str]:
    """A model whose VAE encoder overflows for saturated pixels and whose decoder overflows for every
    input: (folder, encoder module, decoder module)."""
    folder = tmp_path_factory.mktemp("two-modules")
    pipe = tiny_flux_fill_pipeline(seed=0)
    encoder = inject_triggered_overflow(pipe, "image_saturation")
    decoder = inject_overflow(pipe, "vae_decoder")
    pipe.save_pretrained(folder)
    return folder, encoder, decoder


def _two_module_section(run: Callable[..., Any], folder: Path) -> list[str]:
    """The two-module item's failure section, from a seeded run that shrinks each failure 20 calls."""
    result = run(
        f"--fluxguard-model={folder}",
        "--fluxguard-dtype=float16",
        "--fluxguard-mode=raw",
        "--hypothesis-seed=0",
        "--fluxguard-max-size=8",
        "--fluxguard-max-steps=1",
        "--fluxguard-max-sequence-length=8",
        "--fluxguard-max-shrinks=20",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(failed=1)
    return failure_section(result.stdout.str(), "weights/float16/raw")


def test_overflows_in_two_modules_are_two_failures_each_shrunk(pytester, two_modules, keeps_hypothesis_seed):
    """The VAE encoder overflows for saturated pixels, the decoder for every input: two failures.

    A saturated image fails at the encoder, which runs before the decoder; every other call fails at
    the decoder. One failure class would merge them into whichever hypothesis found first; one class
    per module keeps both, each shrunk on its own (here for 20 calls each: the prompt goes first).
    """
    folder, encoder, decoder = two_modules
    section = _two_module_section(pytester.runpytest, folder)
    assert_short_and_quiet(section)
    text = "\n".join(section)
    assert "1 more distinct failure(s), each shrunk" in text
    problems = re.findall(r"(?:first module to go non-finite: |overflows at \w+ in )(\S+)", text)
    assert sorted(problems) == sorted([encoder, decoder]), problems
    assert re.findall(r"prompt=('.*?'),", text) == ["''", "''"]


def _two_module_report(run: Callable[..., Any], folder: Path) -> str:
    """The plugin's own text of the two-module failure, without the saved PNG paths (a temp folder
    per run) or what the libraries print on import (a fresh process's captured output)."""
    section = _two_module_section(run, folder)
    section = list(itertools.takewhile(lambda line: not line.startswith("---"), section))
    return "\n".join(line for line in section if not line.strip().endswith(".png"))


def test_the_same_seed_gives_the_same_shrunk_failures_whatever_the_machine_speed_and_process(
    pytester, two_modules, tmp_path_factory, keeps_hypothesis_seed, monkeypatch
):
    """Two failures, each shrunk: once; again in the same process on a clock that runs 1000 times
    faster (a machine or model that much slower: hypothesis stops looking for more failures after
    10 seconds, and shrinking after 300); again after importing one more local module (hypothesis
    draws literals from the local modules a process has imported); and once in a fresh process.
    The reports are identical.
    """
    folder = two_modules[0]
    first = _two_module_report(pytester.runpytest, folder)
    assert "1 more distinct failure(s), each shrunk" in first
    with monkeypatch.context() as patch:
        for name in ("monotonic", "perf_counter"):
            real = getattr(time, name)
            start = real()
            patch.setattr(time, name, lambda real=real, start=start: start + 1000 * (real() - start))
        slow = _two_module_report(pytester.runpytest, folder)
    assert slow == first
    literals = tmp_path_factory.mktemp("local-code")
    lines = [f"WORD_{n} = ({'x' * n!r}, {n}, {n * 37}, {n / 200})" for n in range(1, 200)]
    (literals / "many_literals.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(literals)
    importlib.import_module("many_literals")
    assert _two_module_report(pytester.runpytest, folder) == first
    assert _two_module_report(pytester.runpytest_subprocess, folder) == first


# -- LoRA repositories -----------------------------------------------------------------------------------


def _save_lora(folder: Path, hot: bool) -> Path:
    """A tiny LoRA on the clean model's single blocks, saved as diffusers' save_lora_weights writes it.

    ``hot``: rank 1, alpha 8192, reading one direction of proj_mlp's input into four channels: past
    float16's range from a LoRA scale of about 1, never at 0.1. Otherwise a small random LoRA.
    """
    pipe = tiny_flux_fill_pipeline(seed=1)
    torch.manual_seed(3)
    rank, alpha = (1, 8192) if hot else (4, 4)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["proj_mlp", "to_q"], init_lora_weights=False
    )
    pipe.transformer.add_adapter(config, adapter_name="lora")
    if hot:
        with torch.no_grad():
            for module in pipe.transformer.modules():
                if hasattr(module, "lora_A") and "lora" in module.lora_A:
                    direction = torch.randn(module.lora_A["lora"].weight.shape[1])
                    module.lora_A["lora"].weight[0] = direction / direction.norm()
                    module.lora_B["lora"].weight.zero_()
                    module.lora_B["lora"].weight[:4, 0] = 8.0
    state = peft.utils.get_peft_model_state_dict(pipe.transformer, adapter_name="lora")
    FluxFillPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["lora"].to_dict(),
    )
    return folder


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "fox": _save_lora(tmp_path_factory.mktemp("fox"), hot=False),
        "hot": _save_lora(tmp_path_factory.mktemp("hot"), hot=True),
    }


def test_each_lora_is_items_per_dtype_and_mode_with_an_ini_twin(pytester, clean_model, loras):
    shutil.copytree(loras["fox"], pytester.path / "fox")
    pytester.makeini("[pytest]\nfluxguard_lora =\n    fox\n")
    result = pytester.runpytest(
        f"--fluxguard-model={clean_model}", "--fluxguard-mode=raw", "--collect-only", "-q"
    )
    name = clean_model.name
    result.stdout.fnmatch_lines(
        [f"{name}::fox-lora/float16/raw", f"{name}::fox-lora/bfloat16/raw", "2 tests collected*"]
    )
    result = pytester.runpytest(
        f"--fluxguard-model={clean_model}",
        f"--fluxguard-lora={loras['fox']}",
        f"--fluxguard-lora={loras['hot']}",
        "--fluxguard-dtype=float16",
        "--collect-only",
        "-q",
    )
    result.stdout.fnmatch_lines_random(
        [f"{name}::{lora.name}-lora/float16/{mode}" for lora in loras.values() for mode in ("raw", "guarded")]
    )
    result.stdout.fnmatch_lines(["4 tests collected*"])


def test_a_lora_without_a_base_model_or_without_weights_is_an_error_naming_the_option(pytester, loras):
    result = pytester.runpytest(f"--fluxguard-lora={loras['fox']}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--fluxguard-lora needs the base model: --fluxguard-model PATH*"])
    empty = pytester.mkdir("empty-lora")
    result = pytester.runpytest(f"--fluxguard-model={pytester.path}", f"--fluxguard-lora={empty}")
    assert result.ret != pytest.ExitCode.OK


def test_a_clean_lora_passes_and_a_hot_one_fails_raw_float16_with_its_drawn_scale(
    pytester, clean_model, loras, keeps_hypothesis_profile
):
    pytester.makeconftest(NO_SHRINK)
    common = [
        f"--fluxguard-model={clean_model}",
        "--fluxguard-dtype=float16",
        "--hypothesis-profile=no-shrink",
    ]
    result = pytester.runpytest(*common, f"--fluxguard-lora={loras['fox']}", *FAST)
    result.assert_outcomes(passed=2)
    options = [*common, f"--fluxguard-lora={loras['hot']}", "--fluxguard-mode=raw", "--fluxguard-examples=8"]
    result = pytester.runpytest(*options, *FAST[1:])
    result.assert_outcomes(failed=1)
    section = failure_section(result.stdout.str(), f"{loras['hot'].name}-lora/float16/raw")
    assert_short_and_quiet(section)
    scales = [
        float(value) for value in re.findall(r"^    lora_scale=([0-9.e-]+),$", "\n".join(section), re.M)
    ]
    assert len(scales) == 1 and 0.1 < scales[0] <= 1.5
    # Told a smaller range, the same LoRA passes: the scale really is drawn per call.
    result = pytester.runpytest(*options, "--fluxguard-lora-scale=0.1", *FAST[1:])
    result.assert_outcomes(passed=1)


# -- any pipeline class: the folder's class decides what an item draws ---------------------------------


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny saved folders of other pipeline classes: SD 1.5 clean and overflowing, Flux Kontext clean."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("sd15", "sd15-hot", "flux_kontext")}
    FAMILIES["sd15"].save(folders["sd15"])
    assert FAMILIES["sd15"].save(folders["sd15-hot"], site="unet_mid_ff") == UNET_MODULE
    FAMILIES["flux_kontext"].save(folders["flux_kontext"])
    return folders


@pytest.mark.parametrize(
    ("family", "drawn", "not_drawn"),
    [
        ("sd15", set(), {"image", "mask_image", "strength", "max_sequence_length", "max_area"}),
        ("flux_kontext", {"image", "max_sequence_length", "max_area", "_auto_resize"}, {"mask_image"}),
    ],
)
def test_the_pipeline_class_decides_what_a_call_draws(family_models, family, drawn, not_drawn):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(family_models[family])
    shape = call_shape(pipe)
    calls = []

    @settings(max_examples=5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(example=call_inputs(shape, max_size=8 * shape.size_multiple, max_sequence_length=8))
    def draw(example):
        calls.append(example.pipeline_kwargs())

    draw()
    assert all(
        drawn <= set(call) <= shape.parameters | {"generator"}
        and not set(call) & not_drawn
        and call["height"] % shape.size_multiple == 0
        for call in calls
    )
    assert shape.embeds_guidance == (family == "flux_kontext")
    _, limit = item_max_guidance(
        _options(max_guidance=None), Target(Path("m"), None, "float16", "raw", None), shape.embeds_guidance
    )
    assert limit == (guidance_limit("float16") if shape.embeds_guidance else None)


def test_a_clean_sd15_folder_passes_every_default_item(pytester, family_models):
    result = pytester.runpytest(f"--fluxguard-model={family_models['sd15']}", "-v", *FAST)
    result.assert_outcomes(passed=4)
    # Classifier-free guidance is not embedded x 1000: no guidance limit to report.
    assert LIMITATION not in result.stdout.str()


def test_an_overflowing_sd15_unet_fails_raw_float16_naming_it_and_draws_no_image(
    pytester, family_models, keeps_hypothesis_profile
):
    pytester.makeconftest(NO_SHRINK)
    result = pytester.runpytest(
        f"--fluxguard-model={family_models['sd15-hot']}",
        "--fluxguard-dtype=float16",
        "--hypothesis-profile=no-shrink",
        *FAST,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "weights/float16/raw: * pixel values are non-finite*",
            f"first module to go non-finite: {UNET_MODULE}",
            "the same example through GuardedStableDiffusionPipeline:",
            f"  non-finite output at denoise step 0 in {UNET_MODULE}*",
            "FillInputs(",
        ]
    )
    section = failure_section(result.stdout.str(), "weights/float16/raw")
    assert_short_and_quiet(section)
    assert not any(line.startswith(("    image=", "    mask_image=", "    strength=")) for line in section)
    assert not any(line.endswith(("mask.png", "image.png")) for line in section)


def test_a_flux_kontext_folder_collects_and_runs_its_items(pytester, family_models):
    result = pytester.runpytest(
        f"--fluxguard-model={family_models['flux_kontext']}", "--fluxguard-dtype=float16", "-v", *FAST
    )
    result.assert_outcomes(passed=2)
    name = family_models["flux_kontext"].name
    result.stdout.fnmatch_lines_random(
        [f"{name}::weights/float16/{mode} PASSED*" for mode in ("raw", "guarded")]
    )


def test_lora_items_take_flux_pipelines_only(pytester, family_models, loras):
    result = pytester.runpytest(
        f"--fluxguard-model={family_models['sd15']}", f"--fluxguard-lora={loras['fox']}"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["--fluxguard-lora: LoRA items take Flux pipelines, not StableDiffusionPipeline."]
    )
