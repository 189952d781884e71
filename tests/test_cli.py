"""fluxguard fill end to end, and every bad input refused in one line before any model runs."""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_fluxguard as run
from PIL import Image
from tqdm.auto import tqdm

from guarded_diffusers.cli.inputs import MAX_SEQUENCE_LENGTH, OPTION_FOR_ARGUMENT, in_command_terms
from guarded_diffusers.cli.log import GUARD_LOGGER, BarStream, guard_lines
from guarded_diffusers.cli.main import DEFAULT_STRATEGIES
from guarded_diffusers.core import plugins
from guarded_diffusers.core.plan import PlanEntry, PrecisionPlan
from guarded_diffusers.pipelines import call_checks
from guarded_diffusers.pipelines.flux_fill import GuardedFluxFillPipeline
from guarded_diffusers.testing import sample_inputs

FAST = ["--steps", "2", "--max-sequence-length", "32"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sample image and mask as files, a mask of another size, and a file that is not a picture."""
    folder = tmp_path_factory.mktemp("pictures")
    sample = sample_inputs(32)
    files = {name: folder / f"{name}.png" for name in ("image", "mask", "small_mask", "not_a_picture")}
    sample["image"].save(files["image"])
    sample["mask_image"].save(files["mask"])
    sample["mask_image"].resize((16, 32)).save(files["small_mask"])
    files["not_a_picture"].write_text("this is text, not a PNG\n")
    return files


@pytest.fixture(scope="module")
def decoy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Looks like a Flux Fill folder to the path checks but cannot load: any error past them says so."""
    folder = tmp_path_factory.mktemp("decoy")
    (folder / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "FluxFillPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
        )
    )
    (folder / "transformer").mkdir()
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    return folder


def test_help_names_both_commands_and_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "fill" in out and "scan" in out
    status, out, _ = run(capsys, "fill", "--help")
    assert status == 0
    assert "tiny random Flux Fill pipeline with an injected float16" in " ".join(out.split())


def test_fill_on_the_bundled_model_recovers_and_reports(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output, report = tmp_path / "out" / "fill.png", tmp_path / "report.json"
    status, out, err = run(capsys, "fill", "-o", output, "--report", report, *FAST)
    assert status == 0, err
    with Image.open(output) as image:
        assert image.size == (32, 32)
        assert image.mode == "RGB"
    header, row = out.splitlines()[1:3]
    assert header.split() == ["stage", "step", "module", "strategy", "fixed", "module", "error", "recovered"]
    # the block's float32 island is over the default 5 % budget on the tiny model: rescale, in float16
    stage, step, module, strategy, fixed, error, recovered = row.split()
    assert (stage, step, module, strategy, fixed, recovered) == (
        "denoise",
        "0",
        "transformer.single_transformer_blocks.0.proj_mlp",
        "rescale",
        "transformer.single_transformer_blocks.0.proj_mlp",
        "yes",
    )
    assert float(error) <= 2**-8
    assert "2/2" in err  # diffusers' own progress bar, on stderr
    incidents = json.loads(report.read_text())["incidents"]
    assert [(item["module"], item["recovered"]) for item in incidents] == [
        ("transformer.single_transformer_blocks.0.proj_mlp", True)
    ]


def test_fill_without_recovery_exits_1_and_writes_no_image(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output, report = tmp_path / "fill.png", tmp_path / "report.json"
    status, out, err = run(capsys, "fill", "-o", output, "--report", report, "--strategies", "none", *FAST)
    assert status == 1
    assert not output.exists()
    assert err.splitlines()[-1].startswith("fluxguard fill: the guard could not recover")
    assert out.splitlines()[-1].split()[-1] == "no"
    assert json.loads(report.read_text())["incidents"][0]["recovered"] is False


BAD_INPUTS: dict[str, tuple[Callable[[dict[str, Path], Path, Path], list[str | Path]], str]] = {
    "missing model folder": (
        lambda files, decoy, tmp: [
            "fill",
            tmp / "nowhere",
            "--image",
            files["image"],
            "--mask",
            files["mask"],
        ],
        "does not exist",
    ),
    "folder without model_index.json": (
        lambda files, decoy, tmp: [
            "fill",
            files["image"].parent,
            "--image",
            files["image"],
            "--mask",
            files["mask"],
        ],
        "is not a Flux Fill model",
    ),
    "pipeline of another class": (
        lambda files, decoy, tmp: ["fill", tmp / "other", "--image", files["image"], "--mask", files["mask"]],
        "names 'StableDiffusionPipeline'",
    ),
    "scan of a folder that is no pipeline": (
        lambda files, decoy, tmp: ["scan", files["image"].parent, "--out", tmp / "scan"],
        "is not a diffusers pipeline folder",
    ),
    "unreadable image": (
        lambda files, decoy, tmp: ["fill", decoy, "--image", files["not_a_picture"], "--mask", files["mask"]],
        "--image",
    ),
    "mask of another size": (
        lambda files, decoy, tmp: ["fill", decoy, "--image", files["image"], "--mask", files["small_mask"]],
        "is 16x32 but --image",
    ),
    "unknown fill dtype": (lambda files, decoy, tmp: ["fill", decoy, "--dtype", "float8"], "'float8'"),
    "scan in float32": (
        lambda files, decoy, tmp: ["scan", decoy, "--out", tmp, "--dtype", "float32"],
        "'float32'",
    ),
    "no image with a model": (lambda files, decoy, tmp: ["fill", decoy, "--mask", files["mask"]], "--image"),
    "unknown strategy": (
        lambda files, decoy, tmp: ["fill", "--strategies", "upcast,typo"],
        "--strategies upcast,typo",
    ),
    "zero samples": (lambda files, decoy, tmp: ["scan", decoy, "--out", tmp, "--samples", "0"], "--samples"),
    "output format": (
        lambda files, decoy, tmp: ["fill", "-o", tmp / "fill.txt"],
        "unknown image format .txt",
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has mps"))
        if case == "absent device"
        else case
        for case in BAD_INPUTS
    ],
)
def test_bad_input_is_one_line_and_status_2(
    case: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    pictures: dict[str, Path],
    decoy_model: Path,
) -> None:
    build, expected = BAD_INPUTS[case]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    argv = build(pictures, decoy_model, tmp_path)
    if argv[0] == "fill" and "-o" not in argv:
        argv += ["--prompt", "a fox", "-o", tmp_path / "fill.png"]
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"fluxguard {argv[0]}: error: ")
    assert expected in err
    # The decoy cannot load: an error about the inputs proves they were checked before loading.
    assert "cannot load" not in err


def test_a_folder_that_cannot_load_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pictures: dict[str, Path], decoy_model: Path
) -> None:
    argv = ["fill", decoy_model, "--image", pictures["image"], "--mask", pictures["mask"], "--prompt", ""]
    status, _, err = run(capsys, *argv, "-o", tmp_path / "fill.png")
    assert status == 2
    assert err.startswith(f"fluxguard fill: error: cannot load {decoy_model}: ")
    assert len(err.splitlines()) == 1


def test_console_script_refuses_bad_input_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("fluxguard")
    if not script.exists():
        pytest.skip("the fluxguard script is not installed (pip install -e .)")
    result = subprocess.run(
        [script, "scan", tmp_path / "missing", "--out", tmp_path / "scan"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"fluxguard scan: error: model folder {tmp_path / 'missing'} does not exist\n"


def test_help_imports_neither_torch_nor_diffusers() -> None:
    """``fluxguard --help`` answers at once: the heavy libraries load only when a command runs."""
    probe = (
        "import sys; from guarded_diffusers.cli.main import main; main(['--help']); "
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)); "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fill" in result.stdout and "scan" in result.stdout


# --- issue 11: the command speaks in its own options, names missing files, and keeps its lines apart


def test_library_argument_names_become_the_command_options() -> None:
    assert in_command_terms("Unknown recovery strategy in `guard_strategies`: 'upcsat'.") == (
        "Unknown recovery strategy in --strategies: 'upcsat'."
    )
    assert in_command_terms("the plan's fixes add 9 bytes; 3 are left (guard_max_extra_memory)") == (
        "the plan's fixes add 9 bytes; 3 are left (--max-extra-memory)"
    )
    assert in_command_terms("`image` is required; an image of `mask_image`") == (
        "--image is required; an image of --mask"
    )
    assert in_command_terms("`height` must be >= 16") == "the image's height must be >= 16"
    # ordinary words and unknown names are left alone
    assert in_command_terms("the image and `guard_tolerance`") == "the image and `guard_tolerance`"


def test_every_translated_name_is_an_argument_of_the_library() -> None:
    """The table cannot drift: each name is a parameter of from_pretrained or of the call."""
    parameters = set(inspect.signature(GuardedFluxFillPipeline.from_pretrained).parameters)
    parameters |= set(inspect.signature(GuardedFluxFillPipeline.__call__).parameters)
    parameters |= {"dtype", "torch_dtype", "guard_report"}  # from_pretrained's **kwargs; the output's field
    assert set(OPTION_FOR_ARGUMENT) <= parameters


def test_help_states_the_guards_defaults() -> None:
    assert ",".join(plugins.DEFAULT_STRATEGIES) == DEFAULT_STRATEGIES
    assert MAX_SEQUENCE_LENGTH == call_checks.MAX_SEQUENCE_LENGTH


@pytest.fixture
def incomplete_model(saved_model: Callable[..., tuple[Path, str | None]], tmp_path: Path) -> Path:
    """A copy of the tiny clean model, for a test to take files away from."""
    folder, _ = saved_model()
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


@pytest.mark.parametrize(
    ("component", "weights"),
    [("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder_2", "model.safetensors")],
)
def test_a_folder_missing_its_weights_names_the_missing_file(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    pictures: dict[str, Path],
    incomplete_model: Path,
    component: str,
    weights: str,
) -> None:
    (incomplete_model / component / weights).unlink()
    for argv in (
        ["fill", incomplete_model, "--image", pictures["image"], "--mask", pictures["mask"], "--prompt", ""],
        ["scan", incomplete_model, "--out", tmp_path / "scan"],
    ):
        status, _, err = run(capsys, *argv, *(["-o", tmp_path / "fill.png"] if argv[0] == "fill" else []))
        assert status == 2
        assert err == (
            f"fluxguard {argv[0]}: error: model folder {incomplete_model} is incomplete: "
            f"{incomplete_model / component / weights} is missing\n"
        )
        assert ".bin" not in err


def test_a_sharded_folder_missing_a_shard_names_the_shard(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, incomplete_model: Path
) -> None:
    transformer = incomplete_model / "transformer"
    (transformer / "diffusion_pytorch_model.safetensors").rename(
        transformer / "diffusion_pytorch_model-00001-of-00002.safetensors"
    )
    index = {
        "metadata": {},
        "weight_map": {
            "x_embedder.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "proj_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
        },
    }
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    status, _, err = run(capsys, "scan", incomplete_model, "--out", tmp_path / "scan")
    assert status == 2
    assert f"{transformer / 'diffusion_pytorch_model-00002-of-00002.safetensors'} is missing" in err
    assert "diffusion_pytorch_model.safetensors.index.json lists it" in err


# The library's argument names, quoted or not (`strategy`, a plan file's field, may stay quoted).
LIBRARY_NAMES = re.compile(
    r"\b(guard_\w+|guidance_scale|num_inference_steps|max_sequence_length|mask_image)\b"
    r"|`(image|prompt|dtype|torch_dtype|height|width|generator)`"
)
MORE_BAD_INPUTS = {
    "misspelt strategy": (
        ["--strategies", "upcsat"],
        "--strategies upcsat: unknown strategy 'upcsat'; known: ",
    ),
    "strategy twice": (["--strategies", "upcast,upcast"], "--strategies upcast,upcast: upcast named more"),
    "empty strategies": (["--strategies", ","], "name at least one strategy, or none"),
    "negative guidance": (["--guidance", "-1"], "argument --guidance: expected a finite number >= 0"),
    "infinite guidance": (["--guidance", "inf"], "argument --guidance: expected a finite number >= 0"),
    "prompt too long": (["--max-sequence-length", "513"], "argument --max-sequence-length: expected a whole"),
    "budget above 1": (["--max-extra-memory", "2"], "--max-extra-memory 2: expected a fraction"),
}


@pytest.mark.parametrize("case", MORE_BAD_INPUTS)
def test_errors_name_the_commands_options_not_python_arguments(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv, expected = MORE_BAD_INPUTS[case]
    status, out, err = run(capsys, "fill", *argv, "-o", tmp_path / "fill.png")
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not LIBRARY_NAMES.search(err), err


def test_an_image_smaller_than_one_pixel_block_is_refused_by_option(
    capsys: pytest.CaptureFixture[str], saved_model: Callable[..., tuple[Path, str | None]], tmp_path: Path
) -> None:
    folder, _ = saved_model()
    image, mask = tmp_path / "small.png", tmp_path / "small-mask.png"
    sample = sample_inputs(2)  # the tiny model works in 4-pixel blocks (2 x its vae_scale_factor)
    sample["image"].save(image)
    sample["mask_image"].save(mask)
    argv = [
        "fill",
        folder,
        "--image",
        image,
        "--mask",
        mask,
        "--prompt",
        "",
        *FAST,
        "-o",
        tmp_path / "fill.png",
    ]
    status, _, err = run(capsys, *argv)
    assert status == 2, err
    assert err == (
        f"fluxguard fill: error: --image {image} is 2x2 pixels; this model needs at least 4 pixels each way\n"
    )


def test_a_plan_over_the_budget_names_max_extra_memory_which_admits_it(
    capsys: pytest.CaptureFixture[str],
    saved_model: Callable[..., tuple[Path, str | None]],
    tmp_path: Path,
    pictures: dict[str, Path],
) -> None:
    folder, _ = saved_model()
    island = PlanEntry(
        "upcast",
        "transformer.single_transformer_blocks.0",
        "FluxSingleTransformerBlock",
        {"dtype": "float32", "output_absmax": 30000.0},
    )
    plan = PrecisionPlan((island,)).save(tmp_path / "plan.json")
    inputs = ["--image", pictures["image"], "--mask", pictures["mask"], "--prompt", "", "--plan", plan]
    status, _, err = run(capsys, "fill", folder, *inputs, *FAST, "-o", tmp_path / "fill.png")
    assert status == 2
    assert err.startswith(f"fluxguard fill: error: cannot load {folder}: ")
    assert "(--max-extra-memory)" in err and not LIBRARY_NAMES.search(err), err
    status, out, err = run(
        capsys, "fill", folder, *inputs, *FAST, "--max-extra-memory", "0.1", "-o", tmp_path / "f.png"
    )
    assert status == 0, err
    assert out.splitlines()[0] == "no incidents"


BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "2/3 [00:01<00:00, ..." part


def _terminal_lines(text: str) -> list[str]:
    """What a terminal shows for ``text``: each ``\\r`` returns to the line's start and overwrites."""
    shown = []
    for line in text.split("\n"):
        cells: list[str] = []
        column = 0
        for char in line:
            if char == "\r":
                column = 0
                continue
            if column < len(cells):
                cells[column] = char
            else:
                cells.append(char)
            column += 1
        shown.append("".join(cells).rstrip())
    return shown


def test_the_guards_log_lines_never_share_the_progress_bars_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """stderr to a file or a pipe: the bar's line is ended before the guard's line is written."""
    status, _, err = run(
        capsys, "fill", "-o", tmp_path / "fill.png", "--strategies", "clamp", "--steps", "3", *FAST[2:]
    )
    assert status == 0
    lines = err.split("\n")  # physical lines: what a log file holds, \r and all
    logged = [line for line in lines if "guarded_diffusers: non-finite output at denoise step 0" in line]
    warned = [
        line for line in lines if line.startswith("fluxguard fill: warning: no fix came within tolerance")
    ]
    assert len(logged) == 1 and len(warned) == 1, err
    for line in logged + warned:
        assert not BAR.search(line) and "\r" not in line, line
    assert "See the incident table." in warned[0]
    assert any(BAR.search(line) for line in lines)  # the bar is still drawn


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_log_line_clears_the_bar_and_the_bar_is_redrawn_below_it() -> None:
    terminal = _Terminal()
    out = BarStream(terminal)
    with tqdm(total=3, file=out, desc="fill", mininterval=0) as bar:
        bar.update()
        out.line("guarded_diffusers: an incident")
        bar.update()
    shown = [line for line in _terminal_lines(terminal.getvalue()) if line]
    assert shown[0] == "guarded_diffusers: an incident"
    assert all(BAR.search(line) and "incident" not in line for line in shown[1:]), shown


def test_the_guards_log_goes_back_to_how_it_was_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger(GUARD_LOGGER)
    before = (logger.level, logger.propagate, list(logger.handlers))
    with guard_lines(BarStream(sys.stderr), "fill"):
        logger.warning("guarded_diffusers: %s", "an incident")
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert capsys.readouterr().err == "guarded_diffusers: an incident\n"


def _scan_report(capsys: pytest.CaptureFixture[str], folder: Path, out: Path) -> str:
    argv = ["scan", folder, "--out", out, "--samples", "1", "--max-size", "16", "--max-steps", "1"]
    status, _, err = run(capsys, *argv, "--max-sequence-length", "16")
    assert status == 0, err
    return (out / "report.html").read_text(encoding="utf-8")


def _chromium() -> str | None:
    return next((path for name in CHROMIUMS if (path := shutil.which(name))), None)


CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGE_WIDTH = 1200


def test_report_html_module_names_can_wrap(
    capsys: pytest.CaptureFixture[str], saved_model: Callable[..., tuple[Path, str | None]], tmp_path: Path
) -> None:
    folder, _ = saved_model()
    page = _scan_report(capsys, folder, tmp_path / "scan")
    assert "td { overflow-wrap: anywhere; }" in page
    assert '<td class="name">transformer.<wbr>single_transformer_blocks.<wbr>0.<wbr>proj_mlp</td>' in page


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium here (apt-get install chromium)")
def test_report_html_fits_1200_pixels_in_chromium(
    capsys: pytest.CaptureFixture[str], saved_model: Callable[..., tuple[Path, str | None]], tmp_path: Path
) -> None:
    """The page's laid-out width, measured by the browser, is within the window's."""
    folder, _ = saved_model()
    page = _scan_report(capsys, folder, tmp_path / "scan")
    probe = tmp_path / "probe.html"
    measure = "<script>document.body.dataset.width = document.documentElement.scrollWidth;</script>"
    probe.write_text(page.replace("</body>", measure + "</body>"), encoding="utf-8")
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    result = subprocess.run(
        [*browser, f"--window-size={PAGE_WIDTH},800", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    width = re.search(r'data-width="(\d+)"', result.stdout)
    assert width, result.stderr[-2000:]
    assert int(width[1]) <= PAGE_WIDTH
