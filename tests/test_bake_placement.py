"""Where a cut's factor sits: at its writers, or at the V projections before them (placement.py).

On the tiny Flux Fill with ``double_block_stream_growth`` the image and text streams take k=4 and
the double block's attention V path can take it instead of the output projections; the bake bakes
both in float16 and keeps the better, the writers unless the other wins by more than the tolerance.
"""

from __future__ import annotations

import copy

import pytest

from guarded_diffusers import FLOAT16_TOLERANCE_DB, bake
from guarded_diffusers.baking.run import _better_placement
from guarded_diffusers.testing import inject_overflow, sample_inputs, tiny_flux_fill_pipeline

CALL = {**sample_inputs(32), "num_inference_steps": 2, "max_sequence_length": 32, "seed": 0}
BLOCK = "transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def overflowing():
    pipe = tiny_flux_fill_pipeline(seed=0)
    inject_overflow(pipe, "double_block_stream_growth")
    return pipe


def test_both_placements_are_baked_in_float16_and_the_better_is_kept(overflowing):
    result = bake(copy.deepcopy(overflowing), [CALL])
    figures = result.checks.placements_float16
    assert set(figures) == {"writers", "values"}
    assert figures["writers"] != figures["values"]  # the placement does round differently
    assert result.checks.placement == _better_placement(figures)
    assert result.checks.baked_float16 == figures[result.checks.placement]
    assert result.to_dict()["checks"]["placements_float16_db"] == figures


def test_the_values_placement_keeps_the_output_projections_weights_and_the_function(overflowing):
    measured = bake(copy.deepcopy(overflowing), [CALL])
    result = bake(copy.deepcopy(overflowing), [CALL], placement="values")
    exponents = result.scaling.exponents["transformer"]
    for name in (f"{BLOCK}.to_v.weight", f"{BLOCK}.to_v.bias", f"{BLOCK}.add_v_proj.weight"):
        assert exponents[name] == -4
    assert exponents.get(f"{BLOCK}.to_out.0.weight", 0) == 0
    assert exponents.get(f"{BLOCK}.to_add_out.weight", 0) == 0
    assert exponents[f"{BLOCK}.to_out.0.bias"] == -4  # the bias is added after the V path
    assert result.checks.baked_float32 >= 80.0
    assert result.checks.placement == "values" and result.checks.placements_float16 == {}
    assert result.checks.baked_float16 == pytest.approx(measured.checks.placements_float16["values"])


def test_placement_writers_measures_nothing_else(overflowing):
    result = bake(copy.deepcopy(overflowing), [CALL], placement="writers")
    assert result.checks.placement == "writers" and result.checks.placements_float16 == {}
    assert f"{BLOCK}.to_out.0.weight" in result.scaling.exponents["transformer"]


@pytest.mark.parametrize(
    ("figures", "kept"),
    [
        ({"writers": 60.0, "values": 61.0}, "values"),
        ({"writers": 60.0, "values": 60.0 + FLOAT16_TOLERANCE_DB / 2}, "writers"),
        ({"writers": 61.0, "values": 60.0}, "writers"),
    ],
)
def test_a_factor_moves_only_for_more_than_the_tolerance(figures, kept):
    assert _better_placement(figures) == kept


def test_an_unknown_placement_is_refused_before_any_compute(overflowing):
    with pytest.raises(ValueError, match="placement must be one of measured, writers, values, not 'v'"):
        bake(overflowing, [CALL], placement="v")
