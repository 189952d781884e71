"""fluxguard generate: any pipeline folder, its class deciding the inputs; bad input is one line, status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_fluxguard as run
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from guarded_diffusers.testing import sample_inputs
from guarded_diffusers.testing.families import FAMILIES

FAST = ["--steps", "2", "--max-sequence-length", "32", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def sd15_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD 1.5 text-to-image folder with a UNet overflow, and the same weights as image to image."""
    text = tmp_path_factory.mktemp("sd15")
    module = FAMILIES["sd15"].save(text, "unet_mid_ff")
    image = tmp_path_factory.mktemp("sd15-img2img")
    pipe = FAMILIES["sd15"].build(0)
    FAMILIES["sd15"].inject(pipe, "unet_mid_ff")
    StableDiffusionImg2ImgPipeline(**pipe.components).save_pretrained(image)
    return {"text": text, "image": image, "module": Path(module)}


def test_generate_on_the_bundled_model_recovers_and_reports(capsys, tmp_path):
    status, out, _ = run(capsys, "generate", "-o", tmp_path / "g.png", "--report", tmp_path / "r.json")
    assert status == 0
    module = out.splitlines()[0].rsplit(" ", 1)[1]
    assert f"denoise  0     {module}" in out
    assert Image.open(tmp_path / "g.png").size == (32, 32)
    assert json.loads((tmp_path / "r.json").read_text())["incidents"][0]["module"] == module


def test_a_text_to_image_folder_takes_a_prompt_only(capsys, tmp_path, sd15_folders):
    status, out, _ = run(
        capsys, "generate", sd15_folders["text"], "--prompt", "a cup", "-o", tmp_path / "cup.png", *FAST
    )
    assert status == 0 and str(sd15_folders["module"]) in out and (tmp_path / "cup.png").is_file()
    status, _, err = run(
        capsys,
        "generate",
        sd15_folders["text"],
        "--prompt",
        "a cup",
        "--image",
        _picture(tmp_path),
        "-o",
        tmp_path / "no.png",
        *FAST,
    )
    assert status == 2 and "StableDiffusionPipeline takes no image" in err


def test_the_pipeline_class_decides_what_is_required(capsys, tmp_path, sd15_folders):
    output = tmp_path / "out.png"
    status, _, err = run(capsys, "generate", sd15_folders["image"], "--prompt", "a cup", "-o", output, *FAST)
    assert status == 2 and "--image is required by StableDiffusionImg2ImgPipeline" in err
    picture = _picture(tmp_path)
    status, out, _ = run(
        capsys,
        "generate",
        sd15_folders["image"],
        "--prompt",
        "a cup",
        "--image",
        picture,
        "-o",
        output,
        *FAST,
    )
    assert status == 0 and output.is_file() and str(sd15_folders["module"]) in out


def test_bad_input_is_one_line_before_any_model_loads(capsys, tmp_path):
    status, _, err = run(capsys, "generate", tmp_path, "--prompt", "x", "-o", tmp_path / "o.png")
    assert status == 2 and "is not a diffusers pipeline folder" in err and len(err.splitlines()) == 1
    status, _, err = run(capsys, "generate", "--mask", _picture(tmp_path), "-o", tmp_path / "o.png")
    assert status == 2 and "--mask needs --image" in err


def _picture(folder: Path) -> Path:
    path = folder / "picture.png"
    sample_inputs(32)["image"].save(path)
    return path
