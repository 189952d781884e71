"""Quantized compute: GGUF, torchao, optimum-quanto, bitsandbytes and diffusers' layerwise casting.

Each configuration is what a float16 user stacks on Flux: the transformer's weights stored in
fewer bits, its layers computing in float16. The guard must name the overflowing layer, make an
island that really computes in float32 (or decline), decline to shift packed weights, carry a
residual stream through a quantized producer, and put every stored bit back on reset. The float32
and bfloat16 references are the same quantized weights computing in those dtypes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_finite, fill, load
from diffusers import FluxFillPipeline, FluxTransformer2DModel
from torch import nn

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.casting import float32_call
from guarded_diffusers.core.fidelity import psnr
from guarded_diffusers.core.plugins import resolve_strategies
from guarded_diffusers.core.quantized import compute_dtype, kind, quantized_layers
from guarded_diffusers.testing import tiny_flux_fill_pipeline

STEPS = 1  # the overflow and its recovery happen at the first step; later ones only reuse the fix
ROOMY = 0.1  # room for a float32 island on a tiny single block (as in test_strategies)
INJECTED = "transformer.single_transformer_blocks.0.proj_mlp"
RESIDUAL_SITE = "double_block_ff_residual"
RESIDUAL_INJECTED = "transformer.transformer_blocks.0.ff.net.2"
PACKED = ("gguf", "torchao", "quanto", "bitsandbytes")


def _quietly(call: Callable[[], object]) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain float16's NaN cast, degraded fixes, libraries' notices
        return call()


# -- building each configuration's transformer ----------------------------------------------------


def _gguf(folder: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    """Q8_0 GGUF of the saved transformer (diffusers' key names), loaded computing in ``dtype``."""
    gguf = pytest.importorskip("gguf", reason="gguf is not installed (the `dev` extra has it)")
    from diffusers import GGUFQuantizationConfig
    from safetensors.torch import load_file

    path = folder / "transformer.gguf"
    if not path.exists():
        writer = gguf.GGUFWriter(str(path), arch="flux")
        for file in sorted((folder / "transformer").glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                array = tensor.float().numpy()
                if tensor.ndim == 2 and tensor.shape[1] % 32 == 0:  # Q8_0 blocks of 32 along the input
                    packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
                    writer.add_tensor(
                        name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
                    )
                else:
                    writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return FluxTransformer2DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        config=str(folder),
        subfolder="transformer",
        torch_dtype=dtype,
    )


def _torchao(folder: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    pytest.importorskip("torchao", reason="torchao is not installed (the `dev` extra has it)")
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return FluxTransformer2DModel.from_pretrained(
        folder,
        subfolder="transformer",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        torch_dtype=dtype,
    )


def _quanto(folder: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (the `dev` extra has it)")
    from diffusers import QuantoConfig

    return FluxTransformer2DModel.from_pretrained(
        folder,
        subfolder="transformer",
        quantization_config=QuantoConfig(weights_dtype="int8"),
        torch_dtype=dtype,
    )


def _bitsandbytes(folder: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    """NF4 ``Linear4bit`` layers on bitsandbytes' CPU backend, swapped in by hand: diffusers'
    ``BitsAndBytesConfig`` loader refuses to run without a GPU. The float32 and bfloat16 references
    get plain Linears holding the very dequantized NF4 weights (bitsandbytes' own float16 weights)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the `dev` extra has it)")
    import bitsandbytes.functional as bnb_functional

    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float16,
            )
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4").to(
                "cpu"
            )
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            if dtype != torch.float16:  # a reference: the same NF4 weights, dequantized, as a plain layer
                weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
                layer = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                layer.weight.data, layer.bias = weight.float(), child.bias
            setattr(parent, name, layer)
    return model.to(dtype) if dtype != torch.float16 else model


def _layerwise(storage: torch.dtype) -> Callable[[Path, torch.dtype], FluxTransformer2DModel]:
    """``enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)`` on the float16 weights
    (the references too, so their stored float8 bits are the very same)."""

    def build(folder: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
        model = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", torch_dtype=torch.float16
        )
        model = model.to(dtype)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)
        return model

    return build


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    kind: str
    build: Callable[[Path, torch.dtype], FluxTransformer2DModel]
    # float8_e4m3fn holds at most 448: the residual site's massive weights (7500) need e5m2's range.
    residual_build: Callable[[Path, torch.dtype], FluxTransformer2DModel] | None = None


CONFIGS = [
    Config("gguf-q8_0", "gguf", _gguf),
    Config("torchao-int8-weight-only", "torchao", _torchao),
    Config("quanto-qint8", "quanto", _quanto),
    Config("bitsandbytes-nf4-cpu", "bitsandbytes", _bitsandbytes),
    Config(
        "layerwise-float8_e4m3fn",
        "layerwise casting",
        _layerwise(torch.float8_e4m3fn),
        residual_build=_layerwise(torch.float8_e5m2),
    ),
]


@pytest.fixture(scope="module")
def e4m3_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An overflow at ``single_transformer_blocks.0.proj_mlp`` whose weights all fit float8_e4m3fn (<= 448).

    The block's AdaLN scale makes input channels 0..3 256 times larger (its ``norm.linear`` stays
    float16: layerwise casting skips norms); the attention ignores them, the MLP's rows 0..3 read them
    with weight 256 (past 65504 in float16), and ``proj_out`` does not read those MLP channels.
    """
    folder = tmp_path_factory.mktemp("tiny-e4m3")
    pipe = tiny_flux_fill_pipeline(0)
    block, dim, channels = (
        pipe.transformer.single_transformer_blocks[0],
        pipe.transformer.inner_dim,
        slice(0, 4),
    )
    with torch.no_grad():
        block.norm.linear.weight[dim : dim + 4] = 0.0  # AdaLayerNormZeroSingle: (shift, scale, gate)
        block.norm.linear.bias[dim : dim + 4] = 255.0
        for projection in (block.attn.to_q, block.attn.to_k, block.attn.to_v):
            projection.weight[:, channels] = 0.0
        block.proj_mlp.weight[:, channels] = 0.0
        block.proj_mlp.weight[channels, :] = 0.0
        block.proj_mlp.weight[channels, channels] = 256.0
        block.proj_mlp.bias[channels] = 0.0
        block.proj_out.weight[:, dim : dim + 4] = 0.0
    pipe.save_pretrained(folder)
    return folder


def _site_folder(config: Config, saved_model, e4m3_site: Path) -> Path:
    if config.kind == "layerwise casting":
        return e4m3_site
    folder, injected = saved_model("single_block_mlp")
    assert injected == INJECTED
    return folder


def _references(config_build, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Plain diffusers with the same quantized weights computing in float32 and in bfloat16."""
    return tuple(
        fill(
            load(FluxFillPipeline, folder, dtype, transformer=config_build(folder, dtype)),
            num_inference_steps=STEPS,
        ).images
        for dtype in (torch.float32, torch.bfloat16)
    )


# -- what "reset exact" compares ---------------------------------------------------------------------


def _raw(tensor: torch.Tensor) -> object:
    """The stored bits of a tensor, quantized ones included (their inner tensors)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return (type(tensor).__name__, tuple(_raw(getattr(tensor, name)) for name in names))
    plain = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor.data  # GGUFParameter
    return (
        str(plain.dtype),
        plain.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(),
    )


def _stored_state(pipe: FluxFillPipeline) -> dict[str, object]:
    """Every parameter and buffer's type and bits, and how each managed layer computes."""
    state: dict[str, object] = {}
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            state[f"{component}.{name}"] = (type(tensor).__name__, _raw(tensor))
        for name, layer, _ in quantized_layers(module):
            state[f"{component}.{name}:compute"] = (compute_dtype(layer), layer.__dict__.get("forward"))
    return state


def _hooks(pipe: FluxFillPipeline) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        for component in ("transformer", "vae", "text_encoder", "text_encoder_2")
        for m in getattr(pipe, component).modules()
    )


def _faithful(incident, images: np.ndarray, reference: np.ndarray, bfloat16: np.ndarray) -> None:
    """The fidelity rule of "Recovered means faithful"."""
    assert incident.recovered and incident.error is not None and incident.error <= 2.0**-8
    assert psnr(images, reference) >= psnr(bfloat16, reference)


# -- the tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_each_strategy_at_a_quantized_overflowing_layer(config, saved_model, e4m3_site):
    """detect, locate, upcast, rescale (+ clamp), clamp, reset exact: one row of docs/compatibility.md."""
    folder = _site_folder(config, saved_model, e4m3_site)
    reference, bfloat16 = _quietly(lambda: _references(config.build, folder))
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        transformer=config.build(folder, torch.float16),
        guard_max_extra_memory=ROOMY,
    )
    assert kind(pipe.transformer.get_submodule(INJECTED.partition(".")[2])) == config.kind
    before, hooks = _stored_state(pipe), _hooks(pipe)

    runs = [["upcast"], ["rescale", "clamp"]]  # after rescale declines on packed weights, clamp settles it
    if config.kind not in PACKED:
        runs.append(["clamp"])  # float8 storage: rescale settles it, so clamp gets a run of its own
    for strategies in runs:
        pipe.guard.strategies = resolve_strategies(strategies)
        output = _quietly(lambda: fill(pipe, num_inference_steps=STEPS))

        assert all_finite(output.images), strategies
        [incident] = output.guard_report.incidents  # detected, and located at the quantized layer
        assert (incident.stage, incident.module) == ("denoise", INJECTED)
        outcomes = [(a.strategy, a.outcome) for a in incident.attempts]
        if strategies == ["upcast"]:  # an island computing in float32 around the quantized layers
            assert outcomes == [("upcast", "applied")]
            assert incident.fixed_module == "transformer.single_transformer_blocks.0"
            _faithful(incident, output.images, reference, bfloat16)
        elif strategies == ["rescale", "clamp"] and config.kind in PACKED:
            declined = incident.attempts[0]
            assert (declined.strategy, declined.outcome) == ("rescale", "declined")
            assert (
                INJECTED in declined.detail and "cannot shift packed or quantized weights" in declined.detail
            )
            assert incident.strategy == "clamp"
        elif strategies == ["rescale", "clamp"]:  # float8 storage shifts exactly by powers of two
            assert outcomes == [("rescale", "applied")]
            _faithful(incident, output.images, reference, bfloat16)
        if incident.strategy == "clamp" and incident.recovered:  # the quantized consumer ignores the channels
            _faithful(incident, output.images, reference, bfloat16)

        pipe.guard.reset()
        assert _stored_state(pipe) == before, strategies  # every stored bit, compute dtype and forward
        assert _hooks(pipe) == hooks


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_the_residual_stream_is_carried_through_a_quantized_producer(config, saved_model):
    """The producer's scaled-down matmul goes through its own quantized forward; no weight changes."""
    folder, injected = saved_model(RESIDUAL_SITE)
    assert injected == RESIDUAL_INJECTED
    build = config.residual_build or config.build
    reference, bfloat16 = _quietly(lambda: _references(build, folder))
    # Residual alone (clamp as a fallback): a float32 island costs quantized layers no stored bytes,
    # so by default upcast may take this site first.
    pipe = load(
        GuardedFluxFillPipeline,
        folder,
        torch.float16,
        transformer=build(folder, torch.float16),
        guard_strategies=["residual", "clamp"],
    )
    assert kind(pipe.transformer.get_submodule(injected.partition(".")[2])) == config.kind
    before = _stored_state(pipe)

    output = _quietly(lambda: fill(pipe, num_inference_steps=STEPS))

    assert all_finite(output.images)
    first = output.guard_report.incidents[0]
    assert (first.module, first.strategy) == (injected, "residual")
    _faithful(first, output.images, reference, bfloat16)
    assert psnr(output.images, reference) >= psnr(bfloat16, reference)
    assert pipe.transformer.get_submodule(injected.partition(".")[2])._forward_hooks  # the fix's hook
    pipe.guard.reset()
    assert _stored_state(pipe) == before and _hooks(pipe) == 0


class _Packed(torch.Tensor):
    """A quantized weight from a library guarded_diffusers does not know: no ``dequantize()``."""


def test_a_diagnosis_that_fails_is_a_non_finite_error_whose_report_says_why(saved_model):
    folder, injected = saved_model("single_block_mlp")
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16)
    layer = pipe.transformer.get_submodule(injected.partition(".")[2])
    layer.weight = nn.Parameter(layer.weight.data.as_subclass(_Packed), requires_grad=False)
    assert kind(layer) == "quantized"

    with pytest.raises(NonFiniteError, match="diagnosis raised") as raised:
        _quietly(lambda: fill(pipe, num_inference_steps=STEPS))

    [incident] = pipe.guard.last_report.incidents
    assert incident is raised.value.report.incidents[0] and not incident.recovered
    assert (incident.stage, incident.module) == ("denoise", "transformer")
    assert "Unsupported" in incident.detail and injected.partition(".")[2] in incident.detail
    assert "no dequantize()" in incident.detail
    assert _hooks(pipe) == 0 and not pipe.guard.fixes


def test_float32_call_computes_gguf_and_layerwise_layers_in_float32_and_puts_them_back(saved_model):
    folder, injected = saved_model("single_block_mlp")
    name = injected.partition(".")[2]
    inputs = torch.randn(3, 32, dtype=torch.float16)
    gguf_layer = _gguf(folder, torch.float16).get_submodule(name)
    layerwise_layer = _layerwise(torch.float8_e4m3fn)(folder, torch.float16).get_submodule(name)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    stored = layerwise_layer.weight.detach().clone()
    for layer, weight in (
        (gguf_layer, dequantize_gguf_tensor(gguf_layer.weight).float()),
        (layerwise_layer, stored.float()),
    ):
        output = float32_call(layer, (inputs,), {})
        expected = torch.nn.functional.linear(inputs.float(), weight, layer.bias.float())
        assert output.dtype == torch.float32 and torch.allclose(output, expected, rtol=1e-6, atol=1e-3)
        assert compute_dtype(layer) == torch.float16
    assert layerwise_layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layerwise_layer.weight.view(torch.uint8), stored.view(torch.uint8))
