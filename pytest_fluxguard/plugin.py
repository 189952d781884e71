"""pytest11 entry point: options, zero-code collection, fixtures, the fluxguard marker, the summary.

Importing this module must stay cheap (pytest imports it in every session where the package is
installed): torch, diffusers and hypothesis are imported only once a fluxguard item or a
fluxguard-marked test actually runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .baked_folder import FluxGuardBaked
from .collect import OPTIONS_KEY, PIPELINES_KEY, FluxGuardModel, collector_name
from .options import add_options, check_dtypes, resolve
from .pipelines import LoRAUnavailable, PipelineCache
from .profile import PROFILE, fluxguard_settings, register_profile
from .summary import ItemStats, limitations, table

MARKER = "fluxguard"
_MARKER_ARGUMENTS = ("examples", "dtypes")
# Weight sets kept loaded: an item's and its float32 reference; a baked item's examples run three
# (the baked float16 weights, the original in float32 and in bfloat16).
_LOADED = 2
_LOADED_WITH_BAKED = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(examples=None, dtypes=None): hypothesis examples for this @given test (default "
        "--fluxguard-examples, with no deadline) and the dtypes its fluxguard_dtype argument takes "
        "(default --fluxguard-dtype).",
    )
    options = resolve(config)
    config.stash[OPTIONS_KEY] = options
    loaded = _LOADED_WITH_BAKED if options.baked is not None else _LOADED
    config.stash[PIPELINES_KEY] = PipelineCache(options.device, capacity=loaded)
    if config.getoption("hypothesis_profile", None) == PROFILE:
        register_profile(config.rootpath)


def pytest_unconfigure(config: pytest.Config) -> None:
    if PIPELINES_KEY in config.stash:
        config.stash[PIPELINES_KEY].clear()


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Add the model folder's and the baked folder's items next to what the session collected."""
    report = yield
    options = collector.config.stash[OPTIONS_KEY]
    if not (isinstance(collector, pytest.Session) and report.passed):
        return report
    for folder, kind in ((options.model, FluxGuardModel), (options.baked, FluxGuardBaked)):
        if folder is not None:
            name = collector_name(folder, collector.config.rootpath)
            # An explicit node id: derived from the session's, it would depend on the invocation directory.
            report.result.append(kind.from_parent(collector, name=name, path=folder, nodeid=name))
    return report


def _marker_arguments(node: Any) -> dict[str, Any]:
    """The fluxguard marker's keyword arguments, checked; empty when the test has no marker."""
    marker = node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    unknown = set(marker.kwargs) - set(_MARKER_ARGUMENTS)
    if marker.args or unknown:
        pytest.fail(
            f"{node.nodeid}: @pytest.mark.{MARKER} takes only the keywords {', '.join(_MARKER_ARGUMENTS)}.",
            pytrace=False,
        )
    return dict(marker.kwargs)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Check the fluxguard marker at collection; one test per dtype for tests taking ``fluxguard_dtype``."""
    arguments = _marker_arguments(metafunc.definition)
    examples = arguments.get("examples")
    if examples is not None and not (isinstance(examples, int) and examples >= 1):
        pytest.fail(
            f"{metafunc.definition.nodeid}: {MARKER}(examples=...) must be an int >= 1.", pytrace=False
        )
    if "fluxguard_dtype" not in metafunc.fixturenames:
        return
    options = metafunc.config.stash[OPTIONS_KEY]
    dtypes = options.dtypes
    if "dtypes" in arguments:
        dtypes = check_dtypes(arguments["dtypes"], f"{metafunc.definition.nodeid}: {MARKER}(dtypes=...)")
    metafunc.parametrize("fluxguard_dtype", dtypes, indirect=True, ids=list(dtypes))


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside hypothesis' wrapper, which reads the settings
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run a fluxguard-marked @given test with the marker's examples and no deadline."""
    if item.get_closest_marker(MARKER) is None:
        return (yield)
    from hypothesis import is_hypothesis_test

    function = getattr(item, "obj", None)
    test = getattr(function, "__func__", function)
    if not is_hypothesis_test(test):
        return (yield)
    # hypothesis has no public per-call override; its own pytest plugin sets this same attribute.
    applied = test._hypothesis_internal_use_settings
    examples = _marker_arguments(item).get("examples") or item.config.stash[OPTIONS_KEY].examples
    test._hypothesis_internal_use_settings = fluxguard_settings(
        item.config.rootpath, examples, parent=applied
    )
    try:
        return (yield)
    finally:
        test._hypothesis_internal_use_settings = applied


@pytest.fixture(scope="session")
def fluxguard_pipeline(pytestconfig: pytest.Config) -> Callable[..., Any]:
    """``fluxguard_pipeline(path=None, *, variant=None, dtype="float16", guarded=False, lora=None)``.

    Loaded once per session and (path, variant, dtype); ``guarded`` gives the guarded twin (e.g.
    GuardedFluxFillPipeline) on the same modules; ``lora``, a LoRA folder loaded onto them (and
    unloaded when a later call asks for another or none). ``path`` defaults to --fluxguard-model.
    Each call hands the pipeline out with any guard fixes undone, as loaded from disk; within a
    test, a guarded call's fixes also show in the raw pipeline of the same weights until
    ``guard.reset()``.
    """
    options = pytestconfig.stash[OPTIONS_KEY]
    pipelines = pytestconfig.stash[PIPELINES_KEY]

    def load(
        path: str | Path | None = None,
        *,
        variant: str | None = None,
        dtype: Any = "float16",
        guarded: bool = False,
        lora: str | Path | None = None,
    ) -> Any:
        folder = path if path is not None else options.model
        if folder is None:
            pytest.fail(
                "fluxguard_pipeline() needs a path, or --fluxguard-model / fluxguard_model.", pytrace=False
            )
        try:
            return pipelines.get(folder, variant, dtype, guarded=guarded, lora=lora)
        except LoRAUnavailable as error:
            pytest.fail(str(error), pytrace=False)

    return load


@pytest.fixture(scope="session")
def fluxguard_dtype(request: pytest.FixtureRequest) -> str:
    """A dtype name, one test per dtype of the fluxguard marker or --fluxguard-dtype."""
    return request.param


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """One row per fluxguard item, from the counts each item's report carried (xdist workers too)."""
    rows = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            stats = ItemStats.from_properties(getattr(report, "user_properties", ()))
            if stats is not None and getattr(report, "when", None) == "call":
                rows[report.nodeid] = stats
    if rows:
        rows = dict(sorted(rows.items()))
        terminalreporter.write_sep("=", "fluxguard summary")
        for line in [*table(rows), *limitations(rows)]:
            terminalreporter.write_line(line)
