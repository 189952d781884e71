"""fluxguard fill end to end, and every bad input refused in one line before any model runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from guarded_diffusers.cli import main
from guarded_diffusers.testing import sample_inputs

FAST = ["--steps", "2", "--max-sequence-length", "32"]


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


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
        lambda files, decoy, tmp: ["scan", tmp / "other", "--out", tmp / "scan"],
        "names 'StableDiffusionPipeline'",
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
        "import sys; from guarded_diffusers.cli import main; main(['--help']); "
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)); "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fill" in result.stdout and "scan" in result.stdout
