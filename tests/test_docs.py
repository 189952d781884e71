"""Every Python code block in README.md and docs/*.md runs as written; the other blocks stay accurate.

sybil parses the documents and runs each ```python block on its own, in a fresh namespace, as a
user pasting it into a new interpreter would: no block sees another's names. Errors point at the
document's own lines. What a snippet needs from outside is what a user would have:

- the hub id ``black-forest-labs/FLUX.1-Fill-dev`` resolves to one tiny clean Flux Fill pipeline
  (``stabilityai/stable-diffusion-xl-base-1.0`` to a tiny SDXL one)
  saved once per session. Only the hub download step is replaced (``DiffusionPipeline.download``,
  which maps a hub id to a local folder); loading, casting and the guard run as for the real model;
- the working directory is a fresh temporary folder holding the files snippets read: ``cup.png``
  and ``cup-mask.png`` (32x32), ``./flux-fill`` (the tiny pipeline), ``scan/plan.json`` (an empty
  precision plan);
- a pipeline call that does not choose ``num_inference_steps`` or ``max_sequence_length`` gets 2
  steps and 32 tokens instead of FluxFill's 50 and 512, to keep the suite fast; what a snippet
  passes is kept.

Snippets that need an accelerator are written to run anywhere (the README drop-in calls
``enable_model_cpu_offload()`` only when CUDA is present), so none is skipped. To skip one, put
``<!-- skip: next "why" -->`` on the line before its fence (sybil's directive, invisible when the
Markdown is rendered); the test reports it as skipped with the reason. There is none today.

A block that defines ``test_*`` functions is a pytest module (docs/pytest-plugin.md's ``@given``
example): it runs under pytest with the fluxguard plugin pointed at the tiny model.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import re
import shlex
import unittest
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from diffusers import DiffusionPipeline, FluxFillPipeline, StableDiffusionXLPipeline
from sybil import Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

from guarded_diffusers.cli.main import build_parser
from guarded_diffusers.core.plan import PrecisionPlan
from guarded_diffusers.core.plugins import plugin_manager
from guarded_diffusers.core.report import Attempt, FixInForce, Incident
from guarded_diffusers.testing import sample_inputs
from guarded_diffusers.testing.families import FAMILIES

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = PythonEvaluator()
SYBIL = Sybil(parsers=[CodeBlockParser("python", evaluator=PYTHON), SkipParser()])
HUB_ID = "black-forest-labs/FLUX.1-Fill-dev"
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
FAST_CALL = {"num_inference_steps": 2, "max_sequence_length": 32}
# Every snippet runs at 32x32 pixels: SDXL defaults to 1024x1024.
SDXL_FAST_CALL = {"num_inference_steps": 2, "height": 32, "width": 32}
PLUGIN_EXAMPLE = ROOT / "docs" / "examples" / "fluxguard-vae-float32" / "fluxguard_vae_float32.py"
GIVEN_EXAMPLE_BUDGET_S = 60  # issue 11: the @given example passes on a clean model within a minute


def _python_examples(path: Path) -> list[Example]:
    """The ```python blocks of ``path``, freshly parsed: a new namespace and no skip state."""
    return [example for example in SYBIL.parse(path) if example.region.evaluator is PYTHON]


def _is_pytest_module(source: str) -> bool:
    tree = ast.parse(source)
    return any(isinstance(node, ast.FunctionDef) and node.name.startswith("test_") for node in tree.body)


def _blocks(pytest_modules: bool) -> list[Any]:
    return [
        pytest.param(path, example.line, id=f"{path.relative_to(ROOT)}:{example.line}")
        for path in DOCS
        for example in _python_examples(path)
        if _is_pytest_module(example.parsed) == pytest_modules
    ]


SNIPPETS = _blocks(pytest_modules=False)
PYTEST_MODULES = _blocks(pytest_modules=True)


def _example_at(path: Path, line: int) -> Example:
    return next(example for example in _python_examples(path) if example.line == line)


def _fenced_blocks(languages: tuple[str, ...]) -> Iterator[tuple[str, int, str, str]]:
    """(file, line, language, text) of every fenced block in one of ``languages``."""
    fence = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in fence.finditer(text):
            if match[1] in languages:
                line = text.count("\n", 0, match.start()) + 1
                yield str(path.relative_to(ROOT)), line, match[1], match[2]


@pytest.fixture(scope="session")
def docs_model(saved_model: Callable[..., tuple[Path, str | None]]) -> Path:
    """The tiny clean pipeline every snippet loads; the conftest's session model, shared."""
    folder, _ = saved_model()
    return folder


@pytest.fixture(scope="session")
def docs_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny clean SDXL pipeline, for the snippets that guard any pipeline."""
    folder = tmp_path_factory.mktemp("docs-sdxl")
    FAMILIES["sdxl"].save(folder)
    return folder


def _short_calls(monkeypatch: pytest.MonkeyPatch, cls: type, fast: dict[str, Any]) -> None:
    call = cls.__call__

    @functools.wraps(call)
    def short_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self, *args, **{**fast, **kwargs})

    monkeypatch.setattr(cls, "__call__", short_call)


@pytest.fixture
def snippet_world(
    docs_model: Path, docs_sdxl_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A working directory with the files snippets read, the hub id mapped, and short pipeline calls."""
    sample = sample_inputs(32)
    sample["image"].save(tmp_path / "cup.png")
    sample["mask_image"].save(tmp_path / "cup-mask.png")
    (tmp_path / "flux-fill").symlink_to(docs_model, target_is_directory=True)
    (tmp_path / "scan").mkdir()
    PrecisionPlan().save(tmp_path / "scan" / "plan.json")
    monkeypatch.chdir(tmp_path)

    download = DiffusionPipeline.download.__func__

    def local_download(cls: type, pretrained_model_name: str, **kwargs: Any) -> str:
        if pretrained_model_name == HUB_ID:
            return str(docs_model)
        if pretrained_model_name == SDXL_HUB_ID:
            return str(docs_sdxl_model)
        return download(cls, pretrained_model_name, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(local_download))

    _short_calls(monkeypatch, FluxFillPipeline, FAST_CALL)
    _short_calls(monkeypatch, StableDiffusionXLPipeline, SDXL_FAST_CALL)
    return tmp_path


@pytest.fixture
def restores_plugins() -> Iterator[None]:
    """A snippet may register plugins in the process-wide manager (strategies.md does): drop them after."""
    manager = plugin_manager()
    before = set(manager.get_plugins())
    yield
    for plugin in set(manager.get_plugins()) - before:
        manager.unregister(plugin)


@pytest.mark.parametrize(("path", "line"), SNIPPETS)
def test_python_snippet_runs_as_written(
    path: Path, line: int, snippet_world: Path, restores_plugins: None
) -> None:
    examples = list(SYBIL.parse(path))
    index = next(i for i, example in enumerate(examples) if example.line == line)
    example = examples[index]
    if index and examples[index - 1].region.evaluator is not PYTHON:
        examples[index - 1].evaluate()  # a `skip: next` directive right before the block
    example.namespace["__name__"] = "__main__"  # as in a script or an interpreter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            example.evaluate()
        except unittest.SkipTest as skip:
            pytest.skip(f"{path.name}:{line}: {skip}")
    deprecations = [str(warning.message) for warning in caught if "torch_dtype" in str(warning.message)]
    assert not deprecations, f"{path.name}:{line} should pass dtype=, not torch_dtype=: {deprecations}"


@pytest.mark.parametrize(("path", "line"), SNIPPETS + PYTEST_MODULES)
def test_snippets_pass_dtype_not_the_deprecated_torch_dtype(path: Path, line: int) -> None:
    assert "torch_dtype" not in _example_at(path, line).parsed


@pytest.mark.parametrize(("path", "line"), PYTEST_MODULES)
def test_pytest_example_passes_on_a_clean_model(
    path: Path, line: int, pytester: pytest.Pytester, docs_model: Path
) -> None:
    """Run as a user runs it: its own pytest process, the plugin pointed at the model, within a minute."""
    source = _example_at(path, line).parsed
    tests = [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    pytester.makepyfile(test_snippet=source)
    report = pytester.path / "report.xml"
    # -k: only the snippet's tests, not the plugin's own items for the model
    args = ["--fluxguard-model", str(docs_model), "-p", "no:cacheprovider", "-k", " or ".join(tests)]
    try:
        # the limit bounds a runaway search; start-up (torch, diffusers) is not the example's time
        result = pytester.runpytest_subprocess(
            *args, f"--junitxml={report}", timeout=GIVEN_EXAMPLE_BUDGET_S * 2
        )
    except pytester.TimeoutExpired:
        pytest.fail(f"{path.name}:{line} ran past {GIVEN_EXAMPLE_BUDGET_S * 2} s on a clean model")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("passed", 0) >= len(tests), "\n".join(result.outlines[-60:])
    seconds = sum(float(case.get("time", 0)) for case in ElementTree.parse(report).iter("testcase"))
    assert seconds <= GIVEN_EXAMPLE_BUDGET_S, f"{path.name}:{line} took {seconds:.0f} s on a clean model"


def test_every_document_is_searched_and_python_blocks_are_found() -> None:
    assert {path.name for path in DOCS} >= {"README.md", "cli.md", "strategies.md", "pytest-plugin.md"}
    assert len(SNIPPETS) >= 8 and PYTEST_MODULES


def test_the_plugin_listing_is_the_example_module() -> None:
    """strategies.md shows the example plugin's module, imports included, as the file has it."""
    listing = next(
        example.parsed
        for example in _python_examples(ROOT / "docs" / "strategies.md")
        if "class VaeFloat32" in example.parsed
    )
    module = ast.get_docstring(ast.parse(PLUGIN_EXAMPLE.read_text(encoding="utf-8")), clean=False)
    body = PLUGIN_EXAMPLE.read_text(encoding="utf-8").split(f'"""{module}"""', 1)[1]
    assert listing.strip() == body.strip()


def _fluxguard_argv(command: str) -> list[str] | None:
    """The fluxguard arguments of one shell command line, or None when it is not a fluxguard command."""
    words = shlex.split(command, comments=True)
    if "fluxguard" in words:
        words = words[words.index("fluxguard") + 1 :]
    elif "guarded_diffusers.cli" in words:
        words = words[words.index("guarded_diffusers.cli") + 1 :]
    else:
        return None
    return words[:-1] if words[-1:] == ["..."] else words  # a trailing "..." stands for more options


def _shell_commands(text: str) -> Iterator[str]:
    for command in text.replace("\\\n", " ").splitlines():
        if command.strip() and not command.lstrip().startswith("#"):
            yield command


def test_fluxguard_command_lines_in_the_docs_parse() -> None:
    """Every fluxguard command line in a bash block uses options the command has."""
    parser = build_parser()
    checked = 0
    for file, line, _, text in _fenced_blocks(("bash", "sh", "console")):
        for command in _shell_commands(text):
            argv = _fluxguard_argv(command.lstrip("$ "))
            if argv is None:
                continue
            try:
                parser.parse_args(argv)
            except Exception as error:  # the command's parser raises instead of exiting
                pytest.fail(f"{file}:{line}: `{command.strip()}` does not parse: {error}")
            checked += 1
    assert checked >= 8


def test_json_blocks_match_what_the_code_writes() -> None:
    """The plan example loads as a plan; the report example has exactly the report's fields."""
    incident_fields = {field.name for field in dataclasses.fields(Incident)}
    attempt_fields = {field.name for field in dataclasses.fields(Attempt)}
    fix_fields = {field.name for field in dataclasses.fields(FixInForce)}
    kinds = set()
    for file, line, _, text in _fenced_blocks(("json",)):
        data = json.loads(text)
        if data.get("format") == "guarded-diffusers/precision-plan":
            PrecisionPlan.from_dict(data, source=f"{file}:{line}")
            kinds.add("plan")
        elif "incidents" in data:
            assert set(data) == {"incidents", "fixes"}, f"{file}:{line}"
            for incident in data["incidents"]:
                assert set(incident) == incident_fields, f"{file}:{line}"
                for attempt in incident["attempts"]:
                    assert set(attempt) == attempt_fields, f"{file}:{line}"
            for fix in data["fixes"]:
                assert set(fix) == fix_fields, f"{file}:{line}"
            kinds.add("report")
    assert kinds == {"plan", "report"}
