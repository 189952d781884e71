"""The pytest11 plugin end to end: pytester sessions against tiny models saved to temp folders."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # hypothesis depends on the backport there
    from exceptiongroup import ExceptionGroup

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from guarded_diffusers import GuardReport, Incident
from guarded_diffusers.testing import SILENTLY_CLIPPED_SITES, save_tiny_pipeline, tiny_flux_fill_pipeline
from pytest_fluxguard import recipes
from pytest_fluxguard.collect import Target
from pytest_fluxguard.failures import ExampleFailed
from pytest_fluxguard.fuzz import GuardedCheck, _example_failures, _how_far
from pytest_fluxguard.inputs import FillInputs
from pytest_fluxguard.model_folder import weight_variants
from pytest_fluxguard.options import FluxGuardOptions
from pytest_fluxguard.pipelines import PipelineCache
from pytest_fluxguard.strategies import fill_inputs
from pytest_fluxguard.summary import ItemStats

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
# A profile without hypothesis' shrink phase, for items whose every example fails the same way:
# the first failure is as good as the minimal one, and shrinking a float16 model on CPU takes minutes.
NO_SHRINK = (
    "from hypothesis import Phase, settings\n"
    "settings.register_profile('no-shrink', phases=[Phase.explicit, Phase.reuse, Phase.generate])\n"
)
MAX_FAILURE_LINES = 40  # a failing item's whole section: message, guard report, PNGs, the example


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


def test_importing_the_plugin_loads_neither_torch_nor_diffusers():
    heavy = ("torch", "diffusers", "transformers", "hypothesis", "numpy")
    probe = f"import sys, pytest_fluxguard.plugin; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_help_lists_the_options_and_ini_twins_in_their_own_group(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "fluxguard: fuzz a Flux Fill model for non-finite pixels:",
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
        (
            '{"_class_name": "FluxPipeline"}',
            "*model_index.json names 'FluxPipeline', not 'FluxFillPipeline'.",
        ),
        (None, "*has no model_index.json, so it is not a diffusers pipeline."),
    ],
)
def test_a_folder_that_is_not_flux_fill_is_one_collection_error(pytester, index, reason):
    folder = pytester.mkdir("not-flux-fill")
    if index is not None:
        (folder / "model_index.json").write_text(index)
    result = pytester.runpytest(f"--fluxguard-model={folder}", *FAST)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting not-flux-fill*", f"--fluxguard-model: {reason}"])


def test_clean_model_passes_every_default_item_of_every_variant(pytester, clean_model):
    # Above 65.5 the guidance itself overflows float16 in every Flux model (guidance x 1000).
    result = pytester.runpytest(
        f"--fluxguard-model={clean_model}", "--fluxguard-max-guidance=65", "-v", *FAST
    )
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
        ["*= fluxguard summary =*", "item * examples  failures  recovered  first offending module"]
    )
    result.stdout.fnmatch_lines_random([f"{name}::{item} * 2 * 0 * 0  -" for item in items])


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
        "--fluxguard-max-guidance=65",
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
    assert len(section) <= MAX_FAILURE_LINES and not any("Captured" in line for line in section)
    name = clipped_model.name
    result.stdout.fnmatch_lines_random(
        [
            f"{name}::weights/float16/raw * {CLIPPED_MODULE}",
            f"{name}::weights/bfloat16/raw * 2 * 0 * 0  -",
        ]
    )


def _fill_example(size: int = 4) -> FillInputs:
    return FillInputs(
        prompt="",
        image=recipes.noise_image(height=size, width=size, seed=0),
        mask_image=recipes.full_mask(height=size, width=size),
        height=size,
        width=size,
        guidance_scale=30.0,
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

    def get(self, path, variant=None, dtype="float16", guarded=False):
        report = self.report

        class Pipeline:
            guard = type("Guard", (), {"reset": staticmethod(lambda: None)})

            def __call__(self, **kwargs):
                return type("Output", (), {"images": np.zeros((1, 4, 4, 3)), "guard_report": report})

        return Pipeline()


def _guarded_check(report: GuardReport) -> GuardedCheck:
    target = Target(Path("model"), None, "float16", "guarded", reference_variant=None)
    options = FluxGuardOptions(
        None, ("float16",), ("guarded",), 1, 16, 1, 16, 65.0, None, Path(".fluxguard"), "cpu"
    )
    return GuardedCheck(target, options, _ReportingPipelines(report), ItemStats())


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
        "--fluxguard-max-guidance=65",
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
            "*run_example(*",
            "*example=FillInputs(*",
            "*mask_image=*_mask(height=*",
        ]
    )
    # A set: with CI set, pytest repeats the whole message in its short summary.
    saved = set(re.findall(r"^  (/\S+\.png)$", result.stdout.str(), flags=re.MULTILINE))
    assert {Path(path).name for path in saved} >= {"output-0.png", "mask.png", "image.png"}
    assert all(Path(path).is_file() for path in saved)  # one output PNG per image of the call
    section = failure_section(result.stdout.str(), "weights/float16/raw")
    assert len(section) <= MAX_FAILURE_LINES and not any("Captured" in line for line in section)
    name = overflowing_model.name
    result.stdout.fnmatch_lines_random(
        [
            f"{name}::weights/float16/raw * {OVERFLOWING_MODULE}",
            f"{name}::weights/float16/guarded * 2 * 0 * {OVERFLOWING_MODULE}",  # an example may recover twice
            f"{name}::weights/bfloat16/raw * 2 * 0 * 0  -",
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
            f"{name}::weights/bfloat16/guarded * 2 * 0 * 0  -",
        ]
    )


def test_hand_written_tests_use_the_fixture_marker_and_strategies(pytester, overflowing_model):
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import pytest
            from hypothesis import given

            from pytest_fluxguard import NonFinitePixels, assert_finite_pixels
            from pytest_fluxguard.strategies import fill_inputs

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
