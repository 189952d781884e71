"""fluxguard scan: float32 headroom predicts each injected float16 overflow; its plan prevents it.

The residual-stream sites (``RESIDUAL_SITES``) overflow the way real checkpoints do: the scan
marks the stream span in float32, before any clip or NaN, and plans ``residual`` on the layers
that produce the out-of-range values, within the guard's default memory budget.
"""

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
from guarded_diffusers.cli.main import main
from guarded_diffusers.core.casting import tensor_bytes
from guarded_diffusers.scan.chart import block_bars, block_of, png_chart, svg_chart
from guarded_diffusers.scan.headroom import (
    VERSION,
    AbsmaxRecorder,
    HeadroomScan,
    ModuleHeadroom,
    StreamBlock,
    merge,
    stream_spans,
)
from guarded_diffusers.scan.plan import plan_from_scan, plan_scan
from guarded_diffusers.scan.samples import draw_samples
from guarded_diffusers.testing import INJECTION_SITES, RESIDUAL_SITES, sample_inputs
from guarded_diffusers.testing.families import FAMILIES
from pytest_fluxguard.calls import call_shape

SAMPLING = ["--max-size", "16", "--max-steps", "2", "--max-sequence-length", "32"]
FLOAT16_MAX = 65504.0

SavedModel = Callable[..., tuple[Path, str | None]]
# Where the residual stream itself passes float16's range in float32 (8e4). At single_block_proj_out
# only the layer does: the block's float32 stream (3e4) fits, float16 clips it because the layer is inf.
STREAM_OUT_OF_RANGE = {"single_block_residual", "double_block_ff_residual"}


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
    # room for an island on a whole block: 7.4 % of the tiny pipeline (well under 1 % in Flux)
    report = scan(capsys, folder, tmp_path, "--samples", "2", "--max-extra-memory", "0.1")
    assert injected in report["at_risk"]
    modules = {module["module"]: module for module in report["modules"]}
    assert modules[injected]["absmax"] > FLOAT16_MAX  # measured in float32, never seen as inf or NaN
    (island,) = json.loads((tmp_path / "plan.json").read_text())["fixes"]
    assert injected.startswith(island["module"] + ".")
    assert not modules[island["module"]]["at_risk"]
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
    pipe = load(FluxFillPipeline, folder, torch.float32)
    (example,) = draw_samples(
        1, shape=call_shape(pipe), max_size=16, max_steps=2, max_sequence_length=32, max_guidance=100
    )
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


def parameter_bytes(pipe: Any) -> int:
    return tensor_bytes(
        [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
    )


def finite_numbers(report: dict[str, Any]) -> bool:
    """Every magnitude the scan recorded is a finite number: nothing overflowed while measuring."""
    values = [module[key] for module in report["modules"] for key in ("absmax", "input_absmax")]
    values += [block["absmax"] for block in report["stream"]["blocks"]]
    return all(isinstance(value, float | int) and math.isfinite(value) for value in values)


@pytest.mark.parametrize("site", sorted(RESIDUAL_SITES))
def test_scan_marks_the_residual_stream_and_plans_it_within_the_default_budget(
    site: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    folder, injected = saved_model(site)
    report = scan(capsys, folder, tmp_path, "--samples", "2")
    assert report["version"] == VERSION == 3 and finite_numbers(report)
    assert report["memory"]["max_extra_memory"] == 0.05
    modules = {module["module"]: module for module in report["modules"]}
    blocks = {block["block"]: block for block in report["stream"]["blocks"]}
    assert all(modules[name]["residual_block"] for name in blocks)
    # T5's blocks are stream blocks too; their stream leaves the position bias out
    assert "text_encoder_2.encoder.block.0" in blocks
    home = block_of(injected)
    assert injected in report["at_risk"] and modules[injected]["layer"]
    assert modules[injected]["absmax"] > FLOAT16_MAX  # in float32: no inf, no NaN, no clip
    if site in STREAM_OUT_OF_RANGE:
        # the stream span: the stream itself is past float16's clipping band, measured in float32
        (span,) = report["stream"]["spans"]
        assert span["first"] == home and span["owner"] == "transformer"
        assert blocks[home]["at_risk"] and blocks[home]["saturated"]
        assert FLOAT16_MAX < blocks[home]["absmax"] < 2 * FLOAT16_MAX
        assert report["stream"]["at_risk"] == span["blocks"]
    else:
        assert report["stream"]["spans"] == [] and not blocks[home]["at_risk"]
        assert modules[injected]["absmax"] > 2 * blocks[home]["absmax"]  # the layer, not the stream
    # No module below the transformer fits (or the block's island passes 5 %): residual on each layer
    # whose own float32 output is out of range, the injected one and the cancelling block's proj_out.
    producers = {
        name
        for name, module in modules.items()
        if module["layer"] and module["at_risk"] and module["absmax"] > FLOAT16_MAX
    }
    assert injected in producers and len(producers) >= 2
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {fix["strategy"] for fix in plan["fixes"]} == {"residual"}
    assert {fix["module"] for fix in plan["fixes"]} == producers
    for fix in plan["fixes"]:
        absmax = modules[fix["module"]]["absmax"]
        assert fix["params"] == {"exponent": max(1, math.ceil(math.log2(absmax * 4 / FLOAT16_MAX)))}
    planning = report["plan"]
    assert planning["unplanned"] == [] and planning["extra_bytes"] == 0
    covered = {name for fix in planning["fixes"] for name in fix["covers"]}
    assert covered == set(report["at_risk"])
    assert all("residual stream travels in float32" in fix["reason"] for fix in planning["fixes"])
    page = (tmp_path / "report.html").read_text()
    assert "Residual stream" in page and "stream span" in page and "residual" in page

    plain = GuardedFluxFillPipeline.from_pretrained(folder, dtype=torch.float16)
    pipe = GuardedFluxFillPipeline.from_pretrained(
        folder, dtype=torch.float16, guard_plan=plan_path(tmp_path)
    )
    pipe.set_progress_bar_config(disable=True)
    output = fill(pipe, num_inference_steps=2, max_sequence_length=32)
    assert output.guard_report.incidents == []
    assert all_finite(output.images)
    assert parameter_bytes(pipe) == parameter_bytes(plain)


def plan_path(folder: Path) -> Path:
    return folder / "plan.json"


def test_islands_stay_where_the_budget_holds_them_and_residual_takes_the_rest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    """10 % holds one single block's island (7.4 %), not two: the second block gets residual."""
    folder, injected = saved_model("single_block_proj_out")
    report = scan(capsys, folder, tmp_path, "--samples", "2", "--max-extra-memory", "0.1")
    fixes = {fix["module"]: fix for fix in report["plan"]["fixes"]}
    assert [(fix["strategy"], name) for name, fix in fixes.items()] == [
        ("upcast", "transformer.single_transformer_blocks.0"),
        ("residual", "transformer.single_transformer_blocks.1.proj_out"),
    ]
    island = fixes["transformer.single_transformer_blocks.0"]
    assert injected in island["covers"]
    assert 0 < island["extra_bytes"] == report["plan"]["extra_bytes"] <= report["memory"]["budget_bytes"]
    assert (
        "--max-extra-memory 0.1 leaves" in fixes["transformer.single_transformer_blocks.1.proj_out"]["reason"]
    )
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        guard_plan=plan_path(tmp_path),
        guard_max_extra_memory=0.1,
    )
    output = fill(pipe, num_inference_steps=2, max_sequence_length=32)
    assert output.guard_report.incidents == []
    assert all_finite(output.images)


def test_what_neither_fix_holds_is_left_out_of_the_plan_with_the_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    """The single block's MLP feeds proj_out directly: residual would hand it float16 again, and the
    block's island passes the default 5 %. The guard's own run-time strategies are left to it."""
    folder, injected = saved_model("single_block_mlp")
    status = main(["scan", str(folder), "--out", str(tmp_path), *SAMPLING, "--samples", "2"])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(plan_path(tmp_path).read_text())["fixes"] == []
    unplanned = {item["module"]: item["reason"] for item in report["plan"]["unplanned"]}
    assert set(unplanned) == set(report["at_risk"]) and injected in unplanned
    assert "proj_out reads the out-of-range values itself" in unplanned[injected]
    assert "(--max-extra-memory 0.076 would hold it)" in unplanned[injected]
    assert f"not planned: {injected}:" in out


def test_max_extra_memory_is_a_fraction(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: SavedModel
) -> None:
    folder, _ = saved_model(None)
    assert main(["scan", str(folder), "--out", str(tmp_path), "--max-extra-memory", "2"]) == 2
    assert "--max-extra-memory 2: expected a fraction" in capsys.readouterr().err


def stream_block(name: str, absmax: float, owner: str = "transformer") -> StreamBlock:
    bits = math.log2(FLOAT16_MAX / absmax)
    return StreamBlock(name, owner, "Block", 1, absmax, bits, bits < 1.0, absmax >= FLOAT16_MAX - 1000)


def test_stream_spans_are_runs_of_at_risk_blocks_of_one_stream_and_the_chart_marks_them() -> None:
    stream = (
        stream_block("transformer.blocks.0", 10.0),
        stream_block("transformer.blocks.1", 7e4),
        stream_block("transformer.blocks.2", 5e4),
        stream_block("transformer.blocks.3", 3.0),
        stream_block("transformer.blocks.4", 4e4),
        stream_block("vae.decoder.up_blocks.0", 4e4, owner="vae.decoder"),
    )
    spans = stream_spans(stream)
    assert [(span.owner, span.blocks) for span in spans] == [
        ("transformer", ("transformer.blocks.1", "transformer.blocks.2")),
        ("transformer", ("transformer.blocks.4",)),
        ("vae.decoder", ("vae.decoder.up_blocks.0",)),
    ]
    assert spans[0].absmax == 7e4 and spans[0].headroom_bits == pytest.approx(math.log2(FLOAT16_MAX / 7e4))
    modules = tuple(headroom(block.block, block.absmax) for block in stream)
    scan = HeadroomScan("m", "float16", 1.0, 1, {}, modules, stream)
    bars = {bar.block: bar for bar in block_bars(scan)}
    assert [name for name, bar in bars.items() if bar.in_span] == [
        "vae.decoder.up_blocks.0",
        "transformer.blocks.1",
        "transformer.blocks.2",
        "transformer.blocks.4",
    ]
    assert bars["transformer.blocks.3"].stream_bits == pytest.approx(math.log2(FLOAT16_MAX / 3.0))
    assert svg_chart(scan).count('fill="#fde0e0"') == 4 and "stream span" in svg_chart(scan)
    chart = png_chart(scan)  # row 0 is vae.decoder.up_blocks.0 (components in pipeline order)
    assert chart.getpixel((chart.width - 80, 30 + 2)) == (253, 224, 224)
    assert chart.getpixel((chart.width - 80, 30 + 22 + 2)) == (255, 255, 255)  # transformer.blocks.0


def test_planner_budget_and_readers() -> None:
    """Costs in float16 bytes added by float32; 1000 parameter bytes, budget 5 % = 50."""

    def module(
        name: str, absmax: float, cost: int, layer: bool = False, input_absmax: float = 1.0
    ) -> ModuleHeadroom:
        bits, input_bits = math.log2(FLOAT16_MAX / absmax), math.log2(FLOAT16_MAX / input_absmax)
        return ModuleHeadroom(
            name,
            "Linear" if layer else "Module",
            1,
            absmax,
            bits,
            input_absmax,
            input_bits,
            min(bits, input_bits) < 1.0,
            layer=layer,
            float32_extra_bytes=cost,
        )

    modules = (
        module("transformer", 2.0, 900),
        module("transformer.a", 10.0, 40),  # fits: island for a.proj (40 <= 50)
        module("transformer.a.proj", 1e5, 10, layer=True),
        module("transformer.b", 10.0, 40),  # fits but 40 + 40 > 50: residual on b.proj
        module("transformer.b.proj", 1e5, 10, layer=True),
        module("vae.decoder", 2.0, 60),
        module("vae.decoder.c", 10.0, 30),  # fits, but 80 > 50 and c.read reads c.make's output: unplanned
        module("vae.decoder.c.make", 1e5, 10, layer=True),
        module("vae.decoder.c.read", 3.0, 10, layer=True, input_absmax=1e5),
    )
    scan = HeadroomScan("m", "float16", 1.0, 1, {}, modules, parameter_bytes=1000, max_extra_memory=0.05)
    planned = plan_scan(scan)
    assert [(fix.entry.strategy, fix.entry.module) for fix in planned.fixes] == [
        ("upcast", "transformer.a"),
        ("residual", "transformer.b.proj"),
    ]
    assert planned.fixes[1].entry.params == {"exponent": 3} and planned.extra_bytes == 40
    assert [item.module for item in planned.unplanned] == ["vae.decoder.c.make", "vae.decoder.c.read"]
    assert "c.read reads the out-of-range values itself" in planned.unplanned[0].reason
    # without a budget (no parameter bytes known) islands are kept as before
    unlimited = HeadroomScan("m", "float16", 1.0, 1, {}, modules)
    assert [entry.module for entry in plan_from_scan(unlimited).entries] == [
        "transformer.a",
        "transformer.b",
        "vae.decoder.c",
    ]


def test_a_text_to_image_folder_is_scanned_with_the_inputs_its_call_takes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """SD 1.5 with a UNet overflow: the scan draws prompts only, finds the layer and plans its fix."""
    folder = tmp_path / "sd15"
    injected = FAMILIES["sd15"].save(folder, "unet_mid_ff")
    report = scan(capsys, folder, tmp_path / "scan", "--samples", "2", "--max-extra-memory", "0.1")
    assert injected in report["at_risk"]
    assert report["sampling"]["pipeline"] == "StableDiffusionPipeline"
    (fix,) = json.loads((tmp_path / "scan" / "plan.json").read_text())["fixes"]
    assert injected == fix["module"] or injected.startswith(fix["module"] + ".")
