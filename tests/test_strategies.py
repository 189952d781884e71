"""Each built-in strategy recovers each injection site; choice and order come from the user."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import all_finite, fill, hook_count, load, state_snapshot
from diffusers import FluxFillPipeline

from guarded_diffusers import DegradedFixWarning, GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.core.plugins import DEFAULT_STRATEGIES
from guarded_diffusers.strategies.clamp import ClampStrategy, saturate
from guarded_diffusers.testing import INJECTION_SITES

BUILTINS = ("upcast", "rescale", "clamp")
# Room for a float32 island on any injection site's region (the tiny single block is 7.4 % of the
# pipeline): these tests are about each strategy's fidelity, the budget is tested on its own.
ROOMY = 0.1


@pytest.mark.parametrize("strategy", BUILTINS)
@pytest.mark.parametrize("site", INJECTION_SITES)
def test_no_false_recovery_each_builtin_alone_at_each_site(saved_model, reference_images, site, strategy):
    """Recovered means at least as faithful as bfloat16; anything less is reported degraded and warned."""
    folder, overflowing = saved_model(site)
    reference, bfloat16 = reference_images(site)
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_strategies=[strategy],
        guard_max_extra_memory=ROOMY,
    )
    before = state_snapshot(pipe)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = fill(pipe)

    assert all_finite(output.images)
    [incident] = output.guard_report.incidents
    assert (incident.module, incident.strategy) == (overflowing, strategy)
    assert incident.recovered != incident.degraded
    degraded_warnings = [w for w in caught if issubclass(w.category, DegradedFixWarning)]
    if incident.recovered:
        assert incident.error <= 2.0**-8
        assert psnr(output.images, reference) >= psnr(bfloat16, reference)
        assert [(a.strategy, a.outcome) for a in incident.attempts] == [(strategy, "applied")]
        assert not degraded_warnings and not output.guard_report.degraded
    else:
        assert incident.error is None or incident.error > 2.0**-8
        [attempt] = incident.attempts
        assert attempt.outcome in ("degraded", "unmeasured")
        assert len(degraded_warnings) == 1 and output.guard_report.degraded
    if strategy != "clamp":  # float32 islands and exact power-of-two shifts are faithful everywhere
        assert incident.recovered
        assert psnr(output.images, reference) > psnr(bfloat16, reference) + 10.0
    pipe.guard.reset()
    assert state_snapshot(pipe) == before
    assert hook_count(pipe) == 0


@pytest.mark.parametrize("site", ["single_block_mlp", "t5_ff", "vae_decoder"])
def test_rescale_changes_only_the_shifted_layers_and_keeps_their_dtype(saved_model, site):
    folder, _ = saved_model(site)
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=["rescale"])
    before = state_snapshot(pipe)

    fill(pipe)

    [fix] = pipe.guard.fixes
    after = state_snapshot(pipe)
    assert {name: dtype for name, (dtype, _) in after.items()} == {
        name: dtype for name, (dtype, _) in before.items()
    }
    changed_modules = {name.rsplit(".", 1)[0] for name in after if after[name] != before[name]}
    described = fix.describe()
    assert changed_modules == {fix.module_name, *described["consumer_shifts"]}
    assert described["relative_error"] <= 2.0**-8


def test_saturate_clamps_infinities_and_zeroes_nan():
    limit = 100.0
    values = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e6, -1e6, 3.0], dtype=torch.float16)
    steps = torch.arange(3)

    saturated, untouched = saturate((values, steps), limit)

    assert saturated.tolist() == [limit, -limit, 0.0, limit, -limit, 3.0]
    assert untouched is steps


@pytest.mark.parametrize("margin", [0.0, 1.5])
def test_clamp_margin_must_be_a_fraction(margin):
    with pytest.raises(ValueError, match="margin"):
        ClampStrategy(margin)


def test_default_order_favours_fidelity(saved_model):
    folder, _ = saved_model()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    assert [strategy.name for strategy in pipe.guard.strategies] == list(DEFAULT_STRATEGIES)
    assert DEFAULT_STRATEGIES == ("guidance", "upcast", "rescale", "stream_rescale", "residual", "clamp")


def test_from_pipe_takes_guard_strategies(saved_model):
    folder, _ = saved_model("clip_mlp")
    pipe = GuardedFluxFillPipeline.from_pipe(
        load(FluxFillPipeline, folder, torch.float16), guard_strategies=["clamp"]
    )
    assert [strategy.name for strategy in pipe.guard.strategies] == ["clamp"]
    assert fill(pipe).guard_report.incidents[0].strategy == "clamp"


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (
            ["upcats"],
            ValueError,
            r"Unknown recovery strategy in `guard_strategies`: 'upcats'\. "
            "Known: clamp, guidance, rescale, residual, stream_rescale, upcast",
        ),
        (["clamp", "clamp"], ValueError, "names a strategy twice"),
        ("clamp", TypeError, "must be a list of names"),
    ],
)
def test_bad_strategy_names_fail_before_loading(tmp_path, names, error, message):
    with pytest.raises(error, match=message):
        GuardedFluxFillPipeline.from_pretrained(tmp_path / "not-loaded", guard_strategies=names)


def test_no_strategies_means_detect_only(saved_model):
    folder, overflowing = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_strategies=[])
    before = state_snapshot(pipe)
    with pytest.raises(NonFiniteError, match="no recovery strategy is enabled") as raised:
        fill(pipe)
    assert raised.value.report.incidents[0].module == overflowing
    assert state_snapshot(pipe) == before
