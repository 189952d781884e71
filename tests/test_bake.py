"""fluxguard bake: exact power-of-two rescales of scale-invariant cuts, baked into the weights.

Held-out overflow cases are baked, written, and run by plain diffusers' FluxFillPipeline in float16
from the written folder; the float32 function must not move (>= 80 dB) and float16 must beat both
the original's float16 and bfloat16. Cuts are found from the traced graph, not from a list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import state_snapshot
from diffusers import FluxFillPipeline, FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from transformers.utils import logging as transformers_logging

import guarded_diffusers
from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.baking.apply import scaling_for
from guarded_diffusers.baking.blockwise import streamed_blocks
from guarded_diffusers.baking.calibrate import calibrate, run_images, tracing
from guarded_diffusers.baking.choose import Choice
from guarded_diffusers.baking.cuts import CutFinder
from guarded_diffusers.baking.run import BakeError, bake
from guarded_diffusers.baking.verify import worst_psnr
from guarded_diffusers.baking.write import PLAN_FILE, SIDECAR, write_baked
from guarded_diffusers.cli.main import main
from guarded_diffusers.core.plan import PrecisionPlan
from guarded_diffusers.testing import (
    LASTING_STREAM_SITES,
    TINY,
    inject_overflow,
    sample_inputs,
    save_tiny_pipeline,
    tiny_flux_fill_pipeline,
)
from guarded_diffusers.testing.builders import tiny_sd3_pipeline
from guarded_diffusers.testing.families import FAMILIES

CALL = {**sample_inputs(32), "num_inference_steps": 2, "max_sequence_length": 32, "guidance_scale": 30.0}
CLI_SAMPLING = ["--samples", "1", "--max-size", "32", "--max-steps", "2"]
FLUX_STREAM_WRITERS = {
    "x_embedder",
    "context_embedder",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.2",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.proj_out",
}
FLUX_STREAM_READERS = {
    "transformer_blocks.0.norm1.norm",
    "transformer_blocks.0.norm1_context.norm",
    "transformer_blocks.0.norm2",
    "transformer_blocks.0.norm2_context",
    "single_transformer_blocks.0.norm.norm",
    "single_transformer_blocks.1.norm.norm",
    "norm_out.norm",
}


def _fp16_psnr(folder: Path, reference: list, **kwargs: Any) -> float:
    """Plain diffusers, float16, from the folder: the path users take."""
    pipe = FluxFillPipeline.from_pretrained(folder, torch_dtype=torch.float16, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return worst_psnr(run_images(pipe, [CALL]), reference)


def _tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as file:
            for key in file.keys():  # noqa: SIM118 (a safetensors handle)
                tensor = file.get_tensor(key)
                found[f"{path.relative_to(folder)}:{key}"] = (tuple(tensor.shape), tensor.dtype)
    return found


@pytest.fixture(scope="module")
def clean_float16(tmp_path_factory: pytest.TempPathFactory) -> float:
    """Clean tiny Flux Fill: plain float16 against its own float32 (~69 dB), the bar baked models meet."""
    folder = tmp_path_factory.mktemp("clean")
    save_tiny_pipeline(folder)
    reference = run_images(FluxFillPipeline.from_pretrained(folder, torch_dtype=torch.float32), [CALL])
    return _fp16_psnr(folder, reference)


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``baked(site)`` -> (src, out, result, float32 reference images): baked in Python, written, cached."""
    cache: dict[str, Any] = {}

    def get(site: str) -> Any:
        if site not in cache:
            root = tmp_path_factory.mktemp(f"bake-{site}")
            save_tiny_pipeline(root / "src", site)
            pipe = FluxFillPipeline.from_pretrained(root / "src", torch_dtype=torch.float32)
            result = bake(pipe, [CALL])
            write_baked(root / "src", root / "out", result)
            cache[site] = (root / "src", root / "out", result, run_images(_original(root / "src"), [CALL]))
        return cache[site]

    return get


def _loading_warnings(folder: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What diffusers and transformers warn while plain ``from_pretrained`` loads ``folder`` in float16."""
    caplog.clear()
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_warning()
        library.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            FluxFillPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    finally:
        for library in (diffusers_logging, transformers_logging):
            library.disable_propagation()
            library.set_verbosity_error()
    return [record.getMessage() for record in caplog.records]


def _original(folder: Path) -> FluxFillPipeline:
    pipe = FluxFillPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux_fill_cuts_come_from_the_traced_graph():
    """The residual stream's writers and readers as Flux's transformer has them; T5, CLIP and VAE cuts too."""
    pipe = tiny_flux_fill_pipeline(0)
    cuts, layers = calibrate(pipe, [CALL]).finder.cuts()
    by_reader = {reader: cut for cut in cuts for reader in cut.readers}
    stream = by_reader["transformer.transformer_blocks.0.norm1.norm"]
    assert {w.removeprefix("transformer.") for w in stream.writers} == FLUX_STREAM_WRITERS
    assert {r.removeprefix("transformer.") for r in stream.readers} == FLUX_STREAM_READERS
    assert stream.pinned is None
    t5 = by_reader["text_encoder_2.encoder.final_layer_norm"]
    assert "text_encoder_2.encoder.embed_tokens" in t5.writers
    assert "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wo" in t5.writers
    assert t5.pinned is None
    clip = by_reader["text_encoder.final_layer_norm"]
    assert {"text_encoder.embeddings.token_embedding", "text_encoder.embeddings.position_embedding"} <= set(
        clip.writers
    )
    assert clip.pinned is None  # Flux reads CLIP's pooled output, after the final norm
    resnet = by_reader["vae.decoder.up_blocks.0.resnets.0.norm2"]
    assert resnet.writers == ["vae.decoder.up_blocks.0.resnets.0.conv1"] and resnet.pinned is None
    # A shortcut conv reads one cut and writes the next: its weight takes the ratio of their scales.
    shortcut = layers["vae.decoder.up_blocks.1.resnets.0.conv_shortcut"]
    assert shortcut[0] is not None and shortcut[1] is not None and shortcut[0] != shortcut[1]


def test_every_cut_found_is_scale_invariant():
    """All cuts at once scaled by 2**+2: the same images, up to float32 rounding.

    A class wrongly taken for a cut (a reader that is not a norm, a missed constant) would move the
    image by far more. Left out: cuts whose eps already counts unscaled (tiny CLIP: eps is 2.6 % of
    its smallest per-token variance), whose function any scale changes.
    """
    pipe = tiny_flux_fill_pipeline(0)
    calibration = calibrate(pipe, [CALL])
    cuts, layers = calibration.finder.cuts()
    scalable = [cut for cut in cuts if cut.scalable]
    eps_bound = [cut.name for cut in scalable if Choice(cut, 0, 0).eps_ratio > 1e-4]
    assert eps_bound == ["text_encoder.encoder.layers.0.layer_norm1"] and len(scalable) >= 20
    chosen = [Choice(cut, -2, -2) for cut in scalable if cut.name not in eps_bound]
    scaling = scaling_for(pipe, chosen, layers)
    scaling.apply()
    assert worst_psnr(run_images(pipe, [CALL]), calibration.images) >= 110.0


class _Reader(torch.nn.Module):
    """A stream written by ``write`` and read by ``norm``, plus one other reader that may break invariance."""

    def __init__(self, other: str) -> None:
        super().__init__()
        self.write, self.head, self.gate = (torch.nn.Linear(8, 8) for _ in range(3))
        self.norm = torch.nn.LayerNorm(8)
        self.other = other

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        stream = self.write(x)
        if self.other == "gate through a layer":  # the layer's weight absorbs the factor
            stream = stream * torch.sigmoid(self.gate(stream))
        elif self.other == "gate from the stream":
            stream = stream * torch.sigmoid(stream)
        elif self.other == "residual from outside":
            stream = stream + residual
        elif self.other == "constant":
            stream = stream + 1.0
        elif self.other == "norm-free reader":
            return self.head(self.norm(stream)) + torch.nn.functional.gelu(stream)
        return self.head(self.norm(stream))


@pytest.mark.parametrize(
    ("other", "pinned"),
    [
        ("none", None),
        ("gate through a layer", None),
        ("gate from the stream", "sigmoid"),
        ("residual from outside", "an input of toy"),
        ("constant", "add with a constant"),
        ("norm-free reader", "gelu"),
    ],
)
def test_what_breaks_invariance_pins_the_cut(other: str, pinned: str | None):
    """The graph's rules on a toy: only a stream read by norms alone (or by layers) is a cut."""
    toy = _Reader(other).eval()
    finder = CutFinder()
    with torch.no_grad(), tracing({"toy": toy}, finder):
        toy(torch.randn(3, 8), torch.randn(3, 8))
    cuts, _ = finder.cuts()
    stream = next(cut for cut in cuts if cut.readers == ["toy.norm"])
    assert stream.pinned == pinned
    assert stream.scalable == (pinned is None)
    if pinned is None:
        assert stream.writers == ["toy.write"]


def test_blocks_streamed_from_the_files_give_the_same_cuts(tmp_path: Path):
    """Block by block (weights read per block forward, meta otherwise): same output, cuts and peaks."""
    save_tiny_pipeline(tmp_path / "src", "single_block_residual")
    pipe = _original(tmp_path / "src")
    calls: list = []
    pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    run_images(pipe, [CALL])
    seen = []
    for streamed in (False, True):
        transformer = FluxTransformer2DModel.from_pretrained(tmp_path / "src" / "transformer").eval()
        finder = CutFinder()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if streamed:
                files = [tmp_path / "src" / "transformer" / "diffusion_pytorch_model.safetensors"]
                blocks = stack.enter_context(streamed_blocks(transformer, files))
                assert blocks[0] == "transformer_blocks.0" and len(blocks) == 3
                assert transformer.single_transformer_blocks[0].proj_out.weight.is_meta
            stack.enter_context(tracing({"transformer": transformer}, finder))
            output = transformer(**calls[0])[0]
        cuts, _ = finder.cuts()
        read = [
            (c.name, c.readers, c.writers, c.passers, c.params, c.pinned, c.peak) for c in cuts if c.readers
        ]
        seen.append((output, read))
    assert torch.equal(seen[0][0], seen[1][0])
    assert seen[0][1] == seen[1][1]
    assert any(peak > 65504 for *_, peak in seen[1][1])


def test_a_pipeline_reading_raw_hidden_states_pins_the_stream():
    """SD3 reads CLIP's penultimate hidden state without a norm: that stream is no cut, and says why."""
    pipe = tiny_sd3_pipeline(0)
    call = {"prompt": "a fox", "height": 32, "width": 32, "num_inference_steps": 1, "max_sequence_length": 32}
    cuts, _ = calibrate(pipe, [call]).finder.cuts()
    clip = next(cut for cut in cuts if "text_encoder.text_model.final_layer_norm" in cut.readers)
    assert clip.pinned == "returned by text_encoder"
    t5 = next(cut for cut in cuts if "text_encoder_3.encoder.final_layer_norm" in cut.readers)
    assert t5.pinned is None


@pytest.mark.parametrize("site", ["single_block_residual", "double_block_ff_residual"])
def test_residual_stream_overflow_is_baked_out(baked: Any, site: str):
    """Clipped (single block) and NaN (double block image stream) streams: k=4 on the one stream cut.

    float16 then beats the original's float16 and bfloat16 by far, but stays ~20 dB under clean
    float16 whatever k (docs/bake.md): these sites add 8e4 to a channel and cancel it a block later,
    and float16 rounds everything next to that constant; a power of two fixes range, not precision.
    """
    _, out, result, reference = baked(site)
    assert [(choice.cut.name, choice.k) for choice in result.scaled] == [
        ("transformer.transformer_blocks.0.norm1.norm", 4)
    ]
    assert result.checks.baked_float32 >= 80.0
    assert result.remaining == []
    plain = _fp16_psnr(out, reference)
    assert plain >= result.checks.original_bfloat16 + 5.0
    assert plain >= result.checks.original_float16 + 20.0
    assert plain == pytest.approx(result.checks.baked_float16, abs=0.5)
    assert result.subnormals["zero_after"] == 0


@pytest.mark.parametrize("site", sorted(LASTING_STREAM_SITES))
def test_lasting_stream_overflow_is_baked_out_to_clean_float16(baked: Any, clean_float16: float, site: str):
    """Streams that stay past float16 to the output norm: a massive channel nothing cancels (NaN), a
    double block's writes growing the image stream (NaN), a single block's growing it (clipped).

    Held out: added after the bake, which was not changed for them. The stream cut takes k=4 and
    float16 from the folder comes within 2 dB of clean float16, where the original is NaN or clipped.
    """
    _, out, result, reference = baked(site)
    assert [(choice.cut.name, choice.k) for choice in result.scaled] == [
        ("transformer.transformer_blocks.0.norm1.norm", 4)
    ]
    assert result.checks.baked_float32 >= 80.0 and result.remaining == []
    assert result.checks.original_float16 < clean_float16 - 20.0
    plain = _fp16_psnr(out, reference)
    assert plain >= clean_float16 - 2.0
    assert plain >= result.checks.original_bfloat16 + 20.0


def test_vae_resnet_overflow_is_baked_out_to_clean_float16(baked: Any, clean_float16: float):
    """Only the one resnet's conv1 -> norm2 cut is scaled; float16 from the folder within 2 dB of clean."""
    _, out, result, reference = baked("vae_decoder")
    assert [choice.cut.writers for choice in result.scaled] == [["vae.decoder.up_blocks.0.resnets.0.conv1"]]
    assert result.checks.baked_float32 >= 80.0
    plain = _fp16_psnr(out, reference)
    assert plain >= clean_float16 - 2.0
    assert result.checks.original_float16 < 10.0  # NaN without the bake


@pytest.mark.parametrize("family", ["flux", "flux_kontext", "sd3", "sdxl", "sd15"])
def test_every_family_bakes_its_vae_resnet(family: str):
    """Flux text-to-image, Kontext, SD3 (MMDiT, three text encoders), SDXL and SD 1.5: same cut, same fix."""
    spec = FAMILIES[family]
    pipe = spec.build(0, TINY)
    spec.inject(pipe, "vae_decoder")
    call = {**spec.call_kwargs(32, 0, 2), "seed": 0}
    del call["generator"], call["output_type"]
    result = bake(pipe, [call])
    assert [choice.cut.writers for choice in result.scaled] == [["vae.decoder.up_blocks.0.resnets.0.conv1"]]
    assert result.checks.baked_float32 >= 80.0 and result.remaining == []
    assert result.checks.baked_float16 >= max(result.checks.original_float16, result.checks.original_bfloat16)


def test_written_folder_is_plain_diffusers(baked: Any, caplog: pytest.LogCaptureFixture):
    """Same tensor names, shapes, dtypes and configs; scales beside the weights; no loading warning."""
    src, out, _, _ = baked("single_block_residual")
    assert _tensors(out) == _tensors(src)
    for config in src.rglob("*.json"):
        assert (out / config.relative_to(src)).read_bytes() == config.read_bytes()
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["exponents"]["transformer"]["x_embedder.weight"] == -4
    assert _loading_warnings(out, caplog) == _loading_warnings(src, caplog) == []
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as file:
        original = safe_open(str(src / "transformer" / "diffusion_pytorch_model.safetensors"), "pt")
        for key in ("x_embedder.weight", "single_transformer_blocks.1.proj_out.bias"):
            assert torch.equal(file.get_tensor(key), original.get_tensor(key) * 2.0**-4)
        assert torch.equal(
            file.get_tensor("norm_out.linear.weight"), original.get_tensor("norm_out.linear.weight")
        )


def test_in_layer_overflow_is_declined_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A feed-forward's first projection feeding GELU: no exact rescale; named, exit 1, nothing written."""
    module = save_tiny_pipeline(tmp_path / "src", "double_block_ff")
    status = main(["bake", str(tmp_path / "src"), str(tmp_path / "out"), *CLI_SAMPLING])
    err = capsys.readouterr().err
    assert status == 1
    assert f"still overflows float16: {module}" in err and "run it guarded" in err
    assert not (tmp_path / "out").exists()
    status = main(
        ["bake", str(tmp_path / "src"), str(tmp_path / "out"), *CLI_SAMPLING, "--allow-remaining", "--plan"]
    )
    assert status == 0, capsys.readouterr().err
    plan = PrecisionPlan.load(tmp_path / "out" / PLAN_FILE)
    assert any(entry.module.startswith("transformer.transformer_blocks.0.ff") for entry in plan.entries)
    assert json.loads((tmp_path / "out" / SIDECAR).read_text())["remaining"][0]["module"] == module
    guarded = GuardedFluxFillPipeline.from_pretrained(
        tmp_path / "out", dtype=torch.float16, guard_plan=tmp_path / "out" / PLAN_FILE
    )
    guarded.set_progress_bar_config(disable=True)
    output = guarded(**{**CALL, "output_type": "np"})
    assert np.isfinite(output.images).all() and output.guard_report.incidents == []


def test_variant_fp16_files_sit_beside_the_originals(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    save_tiny_pipeline(tmp_path / "src", "single_block_residual")
    status = main(["bake", str(tmp_path / "src"), str(tmp_path / "out"), *CLI_SAMPLING, "--variant", "fp16"])
    assert status == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    assert (tmp_path / "out" / "text_encoder_2" / "model.fp16.safetensors").is_file()
    plain = FluxFillPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    variant = FluxFillPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float16, variant="fp16")
    original = plain.transformer.x_embedder.weight
    assert torch.equal(variant.transformer.x_embedder.weight, (original.float() * 2.0**-4).half())


def test_sharded_weights_are_rewritten_shard_by_shard(tmp_path: Path):
    """A sharded transformer: only the shards holding scaled tensors change; the fp16 variant is one file."""
    pipe = tiny_flux_fill_pipeline(0)
    inject_overflow(pipe, "single_block_residual")
    pipe.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    shards = sorted((tmp_path / "src" / "transformer").glob("*.safetensors"))
    assert len(shards) > 2
    result = bake(pipe, [CALL])
    reference = run_images(_original(tmp_path / "src"), [CALL])
    write_baked(tmp_path / "src", tmp_path / "out", result)
    changed = [
        s.name for s in shards if s.read_bytes() != (tmp_path / "out/transformer" / s.name).read_bytes()
    ]
    assert 0 < len(changed) < len(shards)
    assert _tensors(tmp_path / "out") == _tensors(tmp_path / "src")
    assert _fp16_psnr(tmp_path / "out", reference) >= result.checks.original_bfloat16 + 5.0
    write_baked(tmp_path / "src", tmp_path / "variant", result, variant="fp16")
    variant_files = sorted(p.name for p in (tmp_path / "variant/transformer").glob("*.fp16.safetensors"))
    assert variant_files == ["diffusion_pytorch_model.fp16.safetensors"]
    assert (
        _fp16_psnr(tmp_path / "variant", reference, variant="fp16") >= result.checks.original_bfloat16 + 5.0
    )


@pytest.mark.parametrize("case", ["missing", "exists", "not a pipeline", "inside src", "bin weights"])
def test_bad_paths_are_refused_with_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
):
    src, out = tmp_path / "src", tmp_path / "out"
    if case == "exists":
        save_tiny_pipeline(src)
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "not a pipeline":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    elif case == "inside src":
        save_tiny_pipeline(src)
        out = src / "baked"
    elif case == "bin weights":
        tiny_flux_fill_pipeline(0).save_pretrained(src, safe_serialization=False)
    before = sorted(tmp_path.rglob("*"))
    status = main(["bake", str(src), str(out), *CLI_SAMPLING])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("fluxguard bake: error:")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_clean_model_is_left_bit_identical():
    pipe = tiny_flux_fill_pipeline(0)
    before = state_snapshot(pipe)
    result = guarded_diffusers.bake(pipe, [CALL])
    assert result.scaled == [] and result.remaining == [] and math.isinf(result.checks.baked_float32)
    assert state_snapshot(pipe) == before


def test_a_failing_self_check_changes_nothing():
    """k far past what eps allows (2**-8 headroom target): float32 falls under 80 dB; weights untouched."""
    pipe = tiny_flux_fill_pipeline(0)
    inject_overflow(pipe, "vae_decoder")
    before = state_snapshot(pipe)
    with pytest.raises(BakeError, match=r"baked float32 is .* dB from the original, under 80"):
        bake(pipe, [CALL], headroom_peak=2.0**-8, check_float16=False)
    assert state_snapshot(pipe) == before


def test_a_fresh_process_with_diffusers_alone_runs_the_baked_folder_in_float16(baked: Any):
    """The users the bake is for never import this project: plain diffusers in a new process."""
    _, out, _, _ = baked("vae_decoder")
    probe = (
        "import sys, numpy, torch\n"
        "from PIL import Image\n"
        "from diffusers import FluxFillPipeline\n"
        f"pipe = FluxFillPipeline.from_pretrained({str(out)!r}, torch_dtype=torch.float16)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "image = Image.new('RGB', (32, 32), (200, 120, 40))\n"
        "mask = Image.new('L', (32, 32), 255)\n"
        "pixels = pipe(prompt='a cup', image=image, mask_image=mask, height=32, width=32,\n"
        "              num_inference_steps=2, max_sequence_length=32, output_type='np').images\n"
        "print(bool(numpy.isfinite(pixels).all()), [m for m in sys.modules if m.startswith('guarded')])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True []", result.stderr[-2000:]
