"""The plugin's baked item: a folder fluxguard bake wrote, run in float16 with plain diffusers against
its original in float32 and bfloat16, failing by the cut whose headroom ran out.

One tiny model with a VAE encoder resnet that overflows float16 (``vae_encoder``), baked twice on
one 4x4 call: with the default headroom (2**13, k=5) as an fp16 variant beside its originals, and
with none (target 65504, k=2: the call itself fits, and the bake's self-check passes), so larger
pictures than the calibration's run its cut past 65504.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxFillPipeline
from test_fluxguard_plugin import FAST, assert_short_and_quiet, failure_section
from torch import nn

from guarded_diffusers import BakedCut, bake
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.testing import sample_inputs, save_tiny_pipeline
from pytest_fluxguard.baked import Verdict, _precision_lines, _unfaithful
from pytest_fluxguard.headroom import CutMeter, CutPeak, Headroom

pytest_plugins = ["pytester"]

CUT = "vae.encoder.down_blocks.0.resnets.0.norm2"
WRITER = "vae.encoder.down_blocks.0.resnets.0.conv1"
CALIBRATION = {**sample_inputs(4), "num_inference_steps": 1, "max_sequence_length": 16, "seed": 0}


def _bake(src: Path, out: Path, variant: str | None = None, **options: float) -> list[tuple[str, int]]:
    """Bake ``src`` on the one calibration call into ``out``; returns the scaled cuts and their k."""
    pipe = FluxFillPipeline.from_pretrained(src, dtype=torch.float32)
    result = bake(pipe, [CALIBRATION], **options)
    write_baked(src, out, result, variant=variant)
    return [(choice.cut.name, choice.k) for choice in result.scaled]


@pytest.fixture(scope="module")
def bakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bakes")
    save_tiny_pipeline(root / "original", "vae_encoder")
    assert _bake(root / "original", root / "fp16safe", variant="fp16") == [(CUT, 5)]
    assert _bake(root / "original", root / "no-headroom", headroom_peak=65504.0) == [(CUT, 2)]
    return {"original": root / "original", "fp16safe": root / "fp16safe", "tight": root / "no-headroom"}


def test_a_baked_variant_passes_against_the_originals_beside_it(pytester, bakes):
    result = pytester.runpytest(
        f"--fluxguard-baked={bakes['fp16safe']}", "-v", *FAST, "--fluxguard-examples=6"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "fp16safe::fp16-weights/float16/baked PASSED*",
            "fp16safe::fp16-weights/float16/baked * 6 * 0 * 0 * -",
        ]
    )


def test_a_bake_whose_headroom_runs_out_fails_naming_the_cut(pytester, bakes, monkeypatch):
    monkeypatch.setenv("CI", "1")  # derandomised: the same examples on every run
    result = pytester.runpytest(
        f"--fluxguard-baked={bakes['tight']}",
        f"--fluxguard-original={bakes['original']}",
        *FAST,
        "--fluxguard-examples=10",
        "--fluxguard-max-shrinks=10",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ fluxguard weights/float16/baked _*",
            "weights/float16/baked: * pixel values are non-finite*",
            f"headroom ran out at cut {CUT} (scaled by 2**-2): float16 peak inf against float16's max 65504",
            "  calibration peak 2.06e+05 in float32, 5.15e+04 once scaled; "
            "this example reaches * in float32, which needs k >= 3",
            f"  written by {WRITER}; read by {CUT}",
            "*bake again with calibration calls like this example*",
            "saved:",
            "*output-0.png",
            "shrunk example (replay: pipe(**example.pipeline_kwargs(), output_type='np')):",
            "FillInputs(",
        ]
    )
    assert_short_and_quiet(failure_section(result.stdout.str(), "weights/float16/baked"))
    result.stdout.fnmatch_lines([f"no-headroom::weights/float16/baked * {CUT}"])  # the summary's module


def test_an_overflow_the_bake_left_is_told_apart_from_its_cuts(pytester, tmp_path):
    """A feed-forward's first projection: no cut to scale; the guard names it, the bake listed it."""
    module = save_tiny_pipeline(tmp_path / "original", "double_block_ff")
    assert _bake(tmp_path / "original", tmp_path / "remains", variant="fp16") == []
    result = pytester.runpytest(
        f"--fluxguard-baked={tmp_path / 'remains'}", *FAST, "--fluxguard-max-shrinks=0"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "fp16-weights/float16/baked: * pixel values are non-finite*",
            "no baked cut ran out of headroom: the overflow is outside the baked cuts",
            f"  first to overflow float16: denoise step 0 in {module}",
            f"  the bake said these still overflow float16: {module}, *",
        ]
    )


def _not_a_bake(root: Path, bakes: dict[str, Path]) -> Path:
    folder = root / "not-a-bake"
    folder.mkdir()
    for name in ("model_index.json", "vae"):
        (folder / name).symlink_to(bakes["original"] / name)
    (folder / "fluxguard-bake.json").write_text(json.dumps({"format": "guarded-diffusers/bake"}))
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "--fluxguard-baked: */nowhere is not a folder."),
        ("not baked", "--fluxguard-baked: */original is not a baked folder: it has no fluxguard-bake.json*"),
        ("not a record", "--fluxguard-baked: */fluxguard-bake.json is not a bake's record (no exponents)"),
        ("original not given", "--fluxguard-baked: */no-headroom holds the bake in its default weights, *"),
        ("original is a bake", "--fluxguard-original: */no-headroom holds a bake in its default weights*"),
    ],
)
def test_a_folder_that_is_not_a_bake_is_one_collection_error(pytester, bakes, case, message):
    baked, original = {
        "missing": (pytester.path / "nowhere", None),
        "not baked": (bakes["original"], None),
        "not a record": (_not_a_bake(pytester.path, bakes), None),
        "original not given": (bakes["tight"], None),
        "original is a bake": (bakes["fp16safe"], bakes["tight"]),
    }[case]
    extra = [f"--fluxguard-original={original}"] if original is not None else []
    result = pytester.runpytest(
        f"--fluxguard-baked={baked}", *extra, "--collect-only", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


def test_the_original_without_a_baked_folder_is_a_usage_error(pytester, bakes):
    result = pytester.runpytest(f"--fluxguard-original={bakes['original']}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--fluxguard-original goes with --fluxguard-baked PATH (or fluxguard_baked)."]
    )


def test_ini_twins_point_at_the_bake_and_its_original_relative_to_the_ini_file(pytester, bakes):
    for name in ("tight", "original"):
        (pytester.path / bakes[name].name).symlink_to(bakes[name], target_is_directory=True)
    pytester.makeini("[pytest]\nfluxguard_baked = no-headroom\nfluxguard_original = original\n")
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["no-headroom::weights/float16/baked", "1 test collected*"])


# -- the headroom reading and the verdict, on a toy pipeline ----------------------------------------------


class _Toy:
    """A pipeline's ``components``: one model whose layer writes a cut its LayerNorm reads."""

    def __init__(self, scale: float) -> None:
        layer = nn.Linear(4, 4, bias=False).half()
        nn.init.constant_(layer.weight, scale)
        self.components = {"model": nn.Sequential(layer, nn.LayerNorm(4).half())}

    def __call__(self, value: float) -> None:
        self.components["model"](torch.full((1, 4), value, dtype=torch.float16))


TOY_CUT = BakedCut("model.1", 2, 3.0e5, readers=("model.1",), writers=("model.0",))


@pytest.mark.parametrize(
    ("value", "ran_out", "peak"),
    [(1.0, False, 4.0), (2.0e4, True, math.inf), (math.nan, False, math.nan)],
)
def test_the_cut_that_ran_out_is_the_first_past_the_limit_not_a_nan_from_outside(value, ran_out, peak):
    meter, pipe = CutMeter([TOY_CUT]), _Toy(scale=1.0)
    with meter.measuring(pipe):
        pipe(value)
    headroom = meter.read()
    assert (headroom.ran_out is not None) is ran_out
    found = headroom.peaks["model.1"]
    assert found.peak == peak or (math.isnan(found.peak) and math.isnan(peak))
    assert not pipe.components["model"][0]._forward_hooks  # hooks removed


def test_a_loss_without_a_cut_out_of_range_is_precision_and_names_the_closest_cut():
    closest = CutPeak(TOY_CUT, 16384.0, torch.float16)
    other = CutPeak(BakedCut("model.2", 1, 10.0, ("model.2",), ("model.0",)), 8.0, torch.float16)
    headroom = Headroom({"model.1": closest, "model.2": other}, None)
    assert _precision_lines(headroom) == [
        "no baked cut ran out of headroom: the loss is precision, not range",
        "  closest to float16's max: cut model.1 (scaled by 2**-2) at peak 1.64e+04, 2.0 bits of headroom",
    ]
    assert _unfaithful(Verdict(headroom, baked_db=39.95, bfloat16_db=40.0)) is None  # within 0.1 dB
    assert _unfaithful(Verdict(headroom, baked_db=39.8, bfloat16_db=40.0)) == (
        "baked float16 is 39.8 dB from the original in float32, under the original bfloat16's 40.0 dB "
        "(tolerance 0.1 dB)"
    )
