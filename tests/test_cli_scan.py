"""fluxguard scan: float32 headroom predicts each injected float16 overflow; its plan prevents it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import all_finite, fill, load
from diffusers import FluxFillPipeline
from PIL import Image

from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.cli import main
from guarded_diffusers.headroom_chart import block_bars, block_of
from guarded_diffusers.samples import draw_samples
from guarded_diffusers.scan import AbsmaxRecorder, HeadroomScan, ModuleHeadroom, merge
from guarded_diffusers.scan_plan import plan_from_scan
from guarded_diffusers.testing import INJECTION_SITES, sample_inputs

SAMPLING = ["--max-size", "16", "--max-steps", "2", "--max-sequence-length", "32"]
FLOAT16_MAX = 65504.0

SavedModel = Callable[..., tuple[Path, str | None]]


def scan(capsys: pytest.CaptureFixture[str], model: Path, out: Path, *extra: str) -> dict[str, Any]:
    status = main(["scan", str(model), "--out", str(out), *SAMPLING, *extra])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads((out / "report.json").read_text())


def test_clean_model_marks_nothing_and_writes_every_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    folder, _ = saved_model(None)
    report = scan(capsys, folder, tmp_path, "--samples", "2")
    assert report["at_risk"] == []
    assert json.loads((tmp_path / "plan.json").read_text())["fixes"] == []
    lowest = [
        min(
            bits if bits is not None else math.inf
            for bits in (item["headroom_bits"], item["input_headroom_bits"])
        )
        for item in report["modules"]
    ]
    assert lowest == sorted(lowest)
    assert min(item["headroom_bits"] for item in report["modules"]) > 8  # random weights: small outputs
    assert lowest[0] == pytest.approx(math.log2(FLOAT16_MAX / 30000), abs=1e-4)  # guidance 30 x 1000
    page = (tmp_path / "report.html").read_text()
    parser = HTMLParser()
    parser.feed(page)
    assert (
        "<svg" in page
        and "<script" not in page
        and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    )
    with Image.open(tmp_path / "headroom.png") as chart:
        assert chart.format == "PNG"
        assert chart.height > 20 * len(block_bars_of(report))


def block_bars_of(report: dict[str, Any]) -> set[str]:
    return {block_of(module["module"]) for module in report["modules"]}


@pytest.mark.parametrize("site", sorted(INJECTION_SITES))
def test_scan_predicts_the_overflow_and_its_plan_prevents_it(
    site: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    folder, injected = saved_model(site)
    report = scan(capsys, folder, tmp_path, "--samples", "2")
    assert injected in report["at_risk"]
    modules = {module["module"]: module for module in report["modules"]}
    assert modules[injected]["absmax"] > FLOAT16_MAX  # measured in float32, never seen as inf or NaN
    (island,) = json.loads((tmp_path / "plan.json").read_text())["fixes"]
    assert injected.startswith(island["module"] + ".")
    assert not modules[island["module"]]["at_risk"]
    # room for an island on a whole block: 7.4 % of the tiny pipeline (well under 1 % in Flux)
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_plan=tmp_path / "plan.json",
        guard_max_extra_memory=0.1,
    )
    output = fill(pipe, num_inference_steps=2, max_sequence_length=32)
    assert output.guard_report.incidents == []
    assert all_finite(output.images)


def test_report_numbers_match_an_independent_measurement(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    folder, injected = saved_model("t5_ff")
    report = scan(capsys, folder, tmp_path, "--samples", "1")
    (example,) = draw_samples(
        1, max_size=16, multiple=4, max_steps=2, max_sequence_length=32, max_guidance=100
    )
    pipe = load(FluxFillPipeline, folder, torch.float32)
    watched = {
        injected: pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wi_1,
        "text_encoder.encoder.layers.1.mlp.fc1": pipe.text_encoder.encoder.layers[1].mlp.fc1,
        "transformer.single_transformer_blocks.1.proj_out": pipe.transformer.single_transformer_blocks[
            1
        ].proj_out,
        "vae.decoder.conv_out": pipe.vae.decoder.conv_out,
    }
    seen: dict[str, list[float]] = {name: [] for name in watched}
    for name, module in watched.items():
        module.register_forward_hook(
            lambda _m, _a, out, name=name: seen[name].append(np.abs(out.numpy()).max())
        )
    pipe(**example.pipeline_kwargs(), output_type="np")
    modules = {module["module"]: module for module in report["modules"]}
    assert report["samples"] == 1 and report["dtype_max"] == FLOAT16_MAX
    for name, peaks in seen.items():
        absmax = float(max(peaks))
        assert modules[name]["calls"] == len(peaks)
        assert modules[name]["absmax"] == pytest.approx(absmax, rel=1e-6)
        assert modules[name]["headroom_bits"] == pytest.approx(math.log2(FLOAT16_MAX / absmax), abs=1e-4)
        assert modules[name]["at_risk"] == (absmax > FLOAT16_MAX / 2)
    assert modules[injected]["at_risk"]
    # FluxTransformer2DModel hands its embedder the guidance times 1000.
    assert modules["transformer.time_text_embed"]["input_absmax"] == example.guidance_scale * 1000


def test_an_overflow_between_modules_shows_in_the_next_module_input(saved_model: SavedModel) -> None:
    """Guidance 66 overflows float16 inside the transformer's own forward (66 x 1000 > 65504)."""
    folder, _ = saved_model(None)
    pipe = load(FluxFillPipeline, folder, torch.float32)
    recorder = AbsmaxRecorder(pipe)
    fill(pipe, guidance_scale=66.0, num_inference_steps=1, max_sequence_length=32)
    scan = merge(
        [recorder.take(0)], recorder.classes, model="m", dtype="float16", margin_bits=1.0, sampling={}
    )
    embedder = scan.by_name()["transformer.time_text_embed"]
    assert embedder.at_risk and embedder.input_absmax == 66000.0
    assert embedder.headroom_bits > 1  # its output is small: only the input shows the overflow
    plan = plan_from_scan(scan)
    # fixed where it happens, not by a float32 transformer (which the memory budget refuses)
    assert [(entry.strategy, entry.module) for entry in plan.entries] == [
        ("guidance", "transformer.time_text_embed")
    ]
    guarded = load(GuardedFluxFillPipeline, folder, torch.float16, guard_plan=plan)
    output = fill(guarded, guidance_scale=66.0, num_inference_steps=2, max_sequence_length=32)
    assert output.guard_report.incidents == []
    assert all_finite(output.images)


def test_scan_then_fill_with_its_plan_has_no_incident(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    folder, _ = saved_model("vae_decoder")
    scan(capsys, folder, tmp_path / "scan", "--samples", "2")
    sample = sample_inputs(32)
    sample["image"].save(tmp_path / "image.png")
    sample["mask_image"].save(tmp_path / "mask.png")
    argv = [str(folder), "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png")]
    argv += ["--prompt", "a fox", "--steps", "2", "--max-sequence-length", "32"]
    assert main(["fill", *argv, "-o", str(tmp_path / "unplanned.png")]) == 0
    assert "vae_decode" in capsys.readouterr().out
    plan = str(tmp_path / "scan" / "plan.json")
    assert main(["fill", *argv, "--plan", plan, "-o", str(tmp_path / "planned.png")]) == 0
    assert "no incidents" in capsys.readouterr().out.splitlines()


def headroom(module: str, absmax: float, margin: float = 1.0) -> ModuleHeadroom:
    """A module whose inputs are all zero, so its output alone decides."""
    bits = math.log2(FLOAT16_MAX / absmax)
    return ModuleHeadroom(module, "Module", 1, absmax, bits, 0.0, math.inf, bits < margin)


def test_plan_takes_the_smallest_fitting_module_and_drops_nested_islands() -> None:
    modules = (
        headroom("transformer", 10.0),
        headroom("transformer.blocks.0", 30000.0),  # 1.1 bits: fits
        headroom("transformer.blocks.0.ff", 40000.0),  # 0.7 bits: at risk, island is blocks.0
        headroom("transformer.blocks.0.ff.proj", 1e5),
        headroom("transformer.blocks.0.attn", 20.0),
        headroom("transformer.blocks.1.ff.proj", 1e6),  # blocks.1 never ran: island is the component
        headroom("vae.decoder", 5.0),
        headroom("vae.decoder.up.0.conv", 7e4),
        headroom("vae.decoder.up.0", 9.0),
    )
    scan = HeadroomScan("m", "float16", 1.0, 1, {}, modules)
    assert [entry.module for entry in plan_from_scan(scan).entries] == ["transformer", "vae.decoder.up.0"]
    vae_entry = plan_from_scan(scan).entries[1]
    assert vae_entry.params == {"dtype": "float32", "output_absmax": 9.0}


def test_blocks_are_numbered_layers_and_carry_their_lowest_module() -> None:
    assert (
        block_of("transformer.single_transformer_blocks.3.proj_mlp")
        == "transformer.single_transformer_blocks.3"
    )
    assert block_of("transformer.x_embedder") == "transformer.x_embedder"
    assert block_of("vae.decoder.conv_in") == "vae.decoder"
    modules = tuple(
        sorted(
            (headroom("vae.decoder.up_blocks.0.conv", 1e5), headroom("vae.decoder.up_blocks.0", 8.0)),
            key=lambda module: module.headroom_bits,
        )
    )
    (bar,) = block_bars(HeadroomScan("m", "float16", 1.0, 1, {}, modules))
    assert bar.block == "vae.decoder.up_blocks.0" and bar.at_risk
    assert bar.headroom_bits == pytest.approx(math.log2(FLOAT16_MAX / 1e5))
