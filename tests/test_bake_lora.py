"""LoRAs for a baked folder: a LoRA trained on the original weights, scaled like the layers it targets.

A tiny Flux Fill with a residual-stream overflow is baked (the stream's writers scaled by 2**-4). A
real peft LoRA made on the ORIGINAL model targets writers (``x_embedder``, ``to_out.0``,
``ff.net.2``, ``proj_out``, with LoRA biases) and unscaled layers (``to_q``). In float32, the baked
folder with the baked LoRA must give the original-plus-LoRA images (>= 80 dB, the bake's own
fidelity), the baked folder with the LoRA as trained must not; the guarded pipeline loading the
baked folder scales the LoRA itself; bad inputs are refused with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import guarded_diffusers
from guarded_diffusers import GuardedFluxFillPipeline
from guarded_diffusers.baking.calibrate import run_images
from guarded_diffusers.baking.lora import LORA_FILE, METADATA_KEY, NotBakedError, baked_exponents
from guarded_diffusers.baking.run import bake
from guarded_diffusers.baking.verify import worst_psnr
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.cli.main import main
from guarded_diffusers.pipelines import baked_lora
from guarded_diffusers.testing import sample_inputs, save_tiny_pipeline

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* invalid shape")  # peft on 1-D LoRA biases

SITES = ["single_block_residual", "double_block_ff_residual"]
CALL = {**sample_inputs(32), "num_inference_steps": 2, "max_sequence_length": 32, "guidance_scale": 30.0}
WRITERS = ["x_embedder", "to_out.0", "ff.net.2", "proj_out"]
UNSCALED = ["to_q"]
EXACT_DB = 80.0


def _load(cls: type, folder: Path) -> Any:
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe: Any) -> list[np.ndarray]:
    return run_images(pipe, [CALL])


@pytest.fixture(scope="module", params=SITES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The source folder, its bake, a LoRA made on the source, and float32 images of each."""
    root = tmp_path_factory.mktemp(f"bake-lora-{request.param}")
    src, out, lora = root / "src", root / "out", root / "lora"
    save_tiny_pipeline(src, request.param)
    result = bake(_load(FluxFillPipeline, src), [CALL])
    write_baked(src, out, result)
    return {
        "src": src,
        "out": out,
        "lora": lora,
        "result": result,
        "exponents": result.scaling.exponents,
        "plain": _images(_load(FluxFillPipeline, src)),
        "reference": _trained_lora(src, lora, lora_bias=True),
    }


def _trained_lora(src: Path, folder: Path, **options: Any) -> list[np.ndarray]:
    """A random peft LoRA on the original model, saved as diffusers saves LoRAs; the images with it."""
    pipe = _load(FluxFillPipeline, src)
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=[*WRITERS, *UNSCALED], init_lora_weights=False, **options
    )
    pipe.transformer.add_adapter(config, adapter_name="fox")
    if config.use_dora:  # peft starts DoRA's magnitudes at the weights' norms: move them off
        with torch.no_grad():
            for name, parameter in pipe.transformer.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1.5)
    state = peft.utils.get_peft_model_state_dict(pipe.transformer, adapter_name="fox")
    metadata = {**config.to_dict(), "target_modules": sorted(config.target_modules)}
    FluxFillPipeline.save_lora_weights(
        folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    reference = _load(FluxFillPipeline, src)
    reference.load_lora_weights(folder)
    return _images(reference)


def test_bake_lora_scales_b_of_scaled_layers_only_by_their_weight_exponent(case: dict[str, Any]):
    original = load_file(case["lora"] / LORA_FILE)
    baked = guarded_diffusers.bake_lora(case["lora"], like=case["out"])
    exponents = case["exponents"]["transformer"]
    assert baked.keys() == original.keys()
    scaled: set[str] = set()
    for key, tensor in original.items():
        path, _, part = key.removeprefix("transformer.").partition(".lora_")
        exponent = {"A.weight": 0, "B.weight": exponents.get(f"{path}.weight", 0)}.get(
            part, exponents.get(f"{path}.bias", 0)
        )
        assert torch.equal(baked[key], tensor * 2.0**exponent), key  # a power of two: exact
        if exponent:
            scaled.add(path)
    targeted = {key.removeprefix("transformer.").partition(".lora_")[0] for key in original}
    assert scaled == {path for path in targeted if f"{path}.weight" in exponents}
    assert all(any(path.endswith(writer) for path in scaled) for writer in WRITERS)
    assert not any("to_q" in path for path in scaled)


def test_baked_lora_on_the_bake_gives_the_original_with_the_lora(case: dict[str, Any], tmp_path: Path):
    out_lora = tmp_path / "lora-baked"
    assert main(["bake-lora", str(case["lora"]), "--like", str(case["out"]), "-o", str(out_lora)]) == 0
    with safe_open(str(out_lora / LORA_FILE), "pt") as file:
        metadata = file.metadata()
    assert "lora_adapter_metadata" in metadata  # diffusers' adapter config (alpha 8, r 4) travels
    assert json.loads(metadata[METADATA_KEY])  # the exponents applied

    baked = _load(FluxFillPipeline, case["out"])
    baked_alone = worst_psnr(_images(baked), case["plain"])
    baked.load_lora_weights(out_lora)
    with_baked_lora = worst_psnr(_images(baked), case["reference"])
    unscaled = _load(FluxFillPipeline, case["out"])
    unscaled.load_lora_weights(case["lora"])
    with_trained_lora = worst_psnr(_images(unscaled), case["reference"])
    print(
        f"bake {baked_alone:.1f} dB, baked LoRA {with_baked_lora:.1f}, trained LoRA {with_trained_lora:.1f}"
    )
    assert with_baked_lora >= EXACT_DB
    assert with_trained_lora < 40.0  # the LoRA's delta 16 times too large on every writer
    assert worst_psnr(case["plain"], case["reference"]) < 40.0  # the LoRA does change the images


def test_a_dora_magnitude_takes_the_weight_exponent(case: dict[str, Any], tmp_path: Path):
    reference = _trained_lora(case["src"], tmp_path / "dora", use_dora=True)
    state = load_file(tmp_path / "dora" / LORA_FILE)
    assert any(key.endswith("proj_out.lora_magnitude_vector") for key in state)
    assert (
        main(["bake-lora", str(tmp_path / "dora"), "--like", str(case["out"]), "-o", str(tmp_path / "b")])
        == 0
    )
    baked = _load(FluxFillPipeline, case["out"])
    baked.load_lora_weights(tmp_path / "b")
    unscaled = _load(FluxFillPipeline, case["out"])
    unscaled.load_lora_weights(tmp_path / "dora")
    with_baked, with_trained = worst_psnr(_images(baked), reference), worst_psnr(_images(unscaled), reference)
    print(f"DoRA: baked {with_baked:.1f} dB, trained {with_trained:.1f}")
    assert with_baked >= EXACT_DB and with_trained < 40.0


def test_guarded_pipeline_from_a_bake_scales_the_lora_it_loads(case: dict[str, Any]):
    cls = GuardedFluxFillPipeline
    pipe = _load(cls, case["out"])
    assert baked_lora.baked_components(pipe)["transformer"] == case["exponents"]["transformer"]
    pipe.load_lora_weights(case["lora"])
    scaled_on_load = worst_psnr(_images(pipe), case["reference"])
    print(f"guarded pipeline from the bake, LoRA as trained: {scaled_on_load:.1f} dB")
    assert scaled_on_load >= EXACT_DB

    original = _load(cls, case["src"])
    assert baked_lora.baked_components(original) == {}  # not a bake: LoRAs load as they are
    original.load_lora_weights(case["lora"])
    assert worst_psnr(_images(original), case["reference"]) == float("inf")


def test_a_key_whose_layer_the_bake_lacks_is_an_error_naming_it(case: dict[str, Any]):
    state = load_file(case["lora"] / LORA_FILE)
    key = "transformer.single_transformer_blocks.9.proj_out.lora_B.weight"
    with pytest.raises(NotBakedError, match=r"single_transformer_blocks\.9\.proj_out"):
        guarded_diffusers.bake_lora({**state, key: torch.zeros(32, 4)}, like=case["out"])


def test_only_the_variant_that_was_baked_counts(case: dict[str, Any], tmp_path: Path):
    assert baked_exponents(case["out"]) == case["exponents"]
    # --variant fp16 leaves the default files unscaled: only from_pretrained(variant="fp16") is baked.
    write_baked(case["src"], tmp_path / "variant", case["result"], variant="fp16")
    assert baked_exponents(tmp_path / "variant") == {}
    assert baked_exponents(tmp_path / "variant", "fp16") == case["exponents"]


@pytest.mark.parametrize(
    "problem", ["missing lora", "not a lora", "not baked", "output exists", "layer missing"]
)
def test_bad_inputs_are_refused_with_nothing_written(
    case: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
):
    lora, like, output = case["lora"], case["out"], tmp_path / "baked.safetensors"
    if problem == "missing lora":
        lora = tmp_path / "nowhere"
    elif problem == "not a lora":
        lora = tmp_path / "notes.safetensors"
        lora.write_text("hello")
    elif problem == "not baked":
        like = case["src"]
    elif problem == "output exists":
        output.write_text("mine")
    else:
        lora = tmp_path / "extra.safetensors"
        extra = {"transformer.transformer_blocks.3.attn.to_q.lora_A.weight": torch.zeros(4, 32)}
        save_file({**load_file(case["lora"] / LORA_FILE), **extra}, str(lora))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    status = main(["bake-lora", str(lora), "--like", str(like), "-o", str(output)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fluxguard bake-lora: error:")
    if problem == "layer missing":
        assert "transformer_blocks.3.attn.to_q" in err
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
