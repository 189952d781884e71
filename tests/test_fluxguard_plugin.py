"""The pytest11 plugin end to end: pytester sessions against tiny models saved to temp folders."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from guarded_diffusers.testing import save_tiny_pipeline, tiny_flux_fill_pipeline
from pytest_fluxguard.model_folder import weight_variants

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


def test_clean_model_passes_every_item_of_every_variant(pytester, clean_model):
    # Above 65.5 the guidance itself overflows float16 in every Flux model (guidance x 1000).
    result = pytester.runpytest(
        f"--fluxguard-model={clean_model}",
        "--fluxguard-dtype=float16",
        "--fluxguard-max-guidance=65",
        "-v",
        *FAST,
    )
    result.assert_outcomes(passed=4)
    name = clean_model.name
    result.stdout.fnmatch_lines_random(
        [
            f"{name}::weights/float16/raw PASSED*",
            f"{name}::weights/float16/guarded PASSED*",
            f"{name}::fp16-weights/float16/raw PASSED*",
            f"{name}::fp16-weights/float16/guarded PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*= fluxguard summary =*", "item * examples  failures  recovered  first offending module"]
    )
    result.stdout.fnmatch_lines_random([f"{name}::*/float16/* 2 * 0 * 0  -" for _ in range(4)])


def test_overflowing_model_fails_raw_float16_naming_the_module_and_passes_guarded(
    pytester, overflowing_model
):
    result = pytester.runpytest(
        f"--fluxguard-model={overflowing_model}",
        "--fluxguard-dtype=float16,bfloat16",
        "--fluxguard-min-psnr=20",
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
    assert len(saved) == 3 and all(Path(path).is_file() for path in saved)
    name = overflowing_model.name
    result.stdout.fnmatch_lines_random(
        [
            f"{name}::weights/float16/raw * {OVERFLOWING_MODULE}",
            f"{name}::weights/float16/guarded * 2  {OVERFLOWING_MODULE}",
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
            f"{name}::weights/float16/guarded * 2 * 0 * 2  {OVERFLOWING_MODULE}",
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
