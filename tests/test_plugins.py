"""Strategies and observers arrive through pluggy: at run time, and through a real entry point."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import all_finite, fill, load

from guarded_diffusers import GuardedFluxFillPipeline, hookimpl, plugin_manager
from guarded_diffusers.core.casting import Float32Island
from guarded_diffusers.core.plugins import DISABLE_AUTOLOAD_ENV, registered_strategies, resolve_strategies
from guarded_diffusers.strategies.upcast import UpcastFix


class UpcastWholeComponent:
    """A user's strategy written against the public interface: upcast the entire component."""

    name = "whole-component"

    def recover(self, location):
        component = location.calls[-1]
        return self.apply(component.name, {}, lambda _: component.module)

    def apply(self, module_name, params, modules):
        return UpcastFix(module_name, Float32Island(modules(module_name)), None, strategy=self.name)


class WholeComponentPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(UpcastWholeComponent())


@pytest.fixture
def registered():
    """Register plugins for one test; they are unregistered afterwards."""
    plugins = []

    def register(plugin):
        plugin_manager().register(plugin)
        plugins.append(plugin)
        return plugin

    yield register
    for plugin in plugins:
        plugin_manager().unregister(plugin)


@pytest.fixture
def fresh_plugin_manager():
    """A plugin manager built anew, as in a new process; the shared one comes back afterwards."""
    plugin_manager.cache_clear()
    yield plugin_manager
    plugin_manager.cache_clear()


def test_builtins_are_plugins_like_any_other():
    names = {name for name, _ in plugin_manager().list_name_plugin()}
    assert {
        "guarded_diffusers.builtin.upcast",
        "guarded_diffusers.builtin.rescale",
        "guarded_diffusers.builtin.clamp",
    } <= names
    assert {"upcast", "rescale", "clamp"} <= set(registered_strategies())


@pytest.mark.parametrize("site", ["clip_mlp", "single_block_mlp"])
def test_strategy_registered_at_run_time_is_used_by_name(saved_model, registered, site):
    registered(WholeComponentPlugin())
    folder, _ = saved_model(site)
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_strategies=["whole-component"],
        guard_max_extra_memory=1.0,  # a whole component is far over the default 5 %
    )

    output = fill(pipe)

    assert all_finite(output.images)
    [incident] = output.guard_report.incidents
    component = incident.module.split(".")[0]
    assert (incident.strategy, incident.fixed_module) == ("whole-component", component)
    assert getattr(pipe, component).dtype == torch.float32


def test_unregistered_strategy_is_unknown_again(registered):
    plugin = registered(WholeComponentPlugin())
    assert "whole-component" in registered_strategies()
    plugin_manager().unregister(plugin)
    with pytest.raises(ValueError, match="Unknown recovery strategy"):
        resolve_strategies(["whole-component"])
    plugin_manager().register(plugin)  # the fixture unregisters it


def test_two_strategies_with_one_name_are_an_error(registered):
    class Impostor:
        @hookimpl
        def register_strategies(self, register):
            register(UpcastWholeComponent())

    registered(WholeComponentPlugin())
    registered(Impostor())
    with pytest.raises(ValueError, match="Two plugins register a recovery strategy named 'whole-component'"):
        registered_strategies()


def test_a_plugin_that_registers_a_non_strategy_is_named(registered):
    class Broken:
        @hookimpl
        def register_strategies(self, register):
            register(object())

    registered(Broken())
    with pytest.raises(TypeError, match="is not a RecoveryStrategy"):
        registered_strategies()


EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "docs" / "examples" / "fluxguard-vae-float32"


@pytest.fixture
def installed_example_plugin(tmp_path, monkeypatch):
    """docs/examples' plugin laid out in a site directory as pip would install it: module plus dist-info."""
    shutil.copy(EXAMPLE_PLUGIN / "fluxguard_vae_float32.py", tmp_path)
    entry_point = 'vae_float32 = "fluxguard_vae_float32"'
    assert entry_point in (EXAMPLE_PLUGIN / "pyproject.toml").read_text()
    dist_info = tmp_path / "fluxguard_vae_float32-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fluxguard-vae-float32\nVersion: 0.1.0\n"
    )
    (dist_info / "entry_points.txt").write_text("[guarded_diffusers]\n" + entry_point.replace('"', "") + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    yield "vae-float32"
    sys.modules.pop("fluxguard_vae_float32", None)


def test_entry_point_plugin_is_discovered_once(installed_example_plugin, fresh_plugin_manager):
    manager = fresh_plugin_manager()
    assert manager is fresh_plugin_manager()
    assert installed_example_plugin in registered_strategies()
    [(plugin, distribution)] = manager.list_plugin_distinfo()
    assert plugin.__name__ == "fluxguard_vae_float32"
    assert distribution.metadata["Name"] == "fluxguard-vae-float32"


def test_environment_switch_keeps_external_plugins_out(
    installed_example_plugin, fresh_plugin_manager, monkeypatch
):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    fresh_plugin_manager()
    assert installed_example_plugin not in registered_strategies()
    assert {"upcast", "rescale", "clamp"} <= set(registered_strategies())


def test_the_documented_example_plugin_recovers_the_vae_and_declines_elsewhere(
    saved_model, installed_example_plugin, fresh_plugin_manager
):
    vae_folder, _ = saved_model("vae_decoder")
    transformer_folder, _ = saved_model("single_block_mlp")
    order = [installed_example_plugin, "upcast"]

    [over_budget] = fill(
        load(GuardedFluxFillPipeline, vae_folder, torch.float16, guard_strategies=order)
    ).guard_report.incidents
    [vae] = fill(
        load(
            GuardedFluxFillPipeline,
            vae_folder,
            torch.float16,
            guard_strategies=order,
            guard_max_extra_memory=1.0,  # the whole coder in float32: far over the default 5 %
        )
    ).guard_report.incidents
    [transformer] = fill(
        load(
            GuardedFluxFillPipeline,
            transformer_folder,
            torch.float16,
            guard_strategies=order,
            guard_max_extra_memory=0.1,  # room for the tiny single block's float32 island (7.4 %)
        )
    ).guard_report.incidents

    assert (vae.strategy, vae.fixed_module, vae.recovered) == (installed_example_plugin, "vae.decoder", True)
    first, second = over_budget.attempts
    assert (first.strategy, first.outcome) == (installed_example_plugin, "declined")
    assert (second.strategy, second.outcome) == ("upcast", "applied")
    assert "over guard_max_extra_memory" in first.detail
    assert [(a.strategy, a.outcome) for a in transformer.attempts] == [
        (installed_example_plugin, "declined"),
        ("upcast", "applied"),
    ]


def test_observer_sees_every_settled_incident_and_cannot_break_the_call(
    saved_model, registered, caplog, diffusers_warnings
):
    seen = []

    class Recorder:
        @hookimpl
        def incident_recorded(self, incident, pipeline):
            seen.append((incident.module, incident.recovered, pipeline))

    class Crashes:
        @hookimpl
        def incident_recorded(self, incident):
            raise RuntimeError("metrics backend down")

    registered(Recorder())
    registered(Crashes())
    folder, overflowing = saved_model("t5_ff")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    with diffusers_warnings():
        output = fill(pipe)

    assert all_finite(output.images)
    assert seen == [(overflowing, True, pipe)]
    assert any("metrics backend down" in record.getMessage() for record in caplog.records)
