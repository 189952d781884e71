"""Offloading: fixes made through the offload hooks, and offloaded copies put back exactly on reset.

Each configuration is what diffusers or accelerate install, run on the CPU (the onload device is the
CPU here, so the hooks run and move nothing between devices; CUDA streams cannot be made without a
GPU). The guard must fix the overflow so that the weights each hook brings in are the fixed ones,
and ``reset()`` must restore the copies the hooks load from bit for bit: the model's own tensors,
accelerate's ``weights_map`` (parameters on the meta device), the files of group offloading to disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from conftest import all_finite, fill, load

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.fidelity import psnr

SITE = "single_block_mlp"
INJECTED = "transformer.single_transformer_blocks.0.proj_mlp"
CPU = torch.device("cpu")


def sequential(pipe) -> None:
    """What ``enable_sequential_cpu_offload`` installs on each component, here on the transformer:
    diffusers' own call with ``device="cpu"`` fails in plain diffusers too, in the CLIP encoder."""
    cpu_offload(pipe.transformer, execution_device=CPU)


CONFIGS: dict[str, Callable[..., None]] = {
    "model": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
    "group block": lambda pipe: pipe.enable_group_offload(
        CPU, offload_type="block_level", num_blocks_per_group=1
    ),
    "group leaf": lambda pipe: pipe.enable_group_offload(CPU, offload_type="leaf_level"),
    "sequential": sequential,
}


def stored_state(module: torch.nn.Module) -> dict[str, tuple[torch.dtype, torch.dtype, bytes]]:
    """Per tensor: its dtype, and the dtype and bytes of the values a forward loads (accelerate's
    ``weights_map`` copy for a parameter on the meta device, the tensor itself otherwise)."""
    state = {}
    for prefix, owner in module.named_modules():
        hook = getattr(owner, "_hf_hook", None)
        weights_map = hook.weights_map if getattr(hook, "offload", False) else None
        for attr, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            source = weights_map[attr] if tensor.is_meta else tensor
            raw = source.detach().contiguous().view(torch.uint8).numpy().tobytes()
            state[f"{prefix}.{attr}"] = (tensor.dtype, source.dtype, raw)
    return state


def offloaded(folder, config: str, strategy: str):
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=1.0)
    CONFIGS[config](pipe)
    pipe.guard.strategies = [s for s in pipe.guard.strategies if s.name == strategy]
    return pipe


@pytest.mark.parametrize("strategy", ["upcast", "rescale"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_fix_goes_through_the_offload_hooks_and_reset_restores_the_offloaded_weights(
    saved_model, reference_images, config, strategy
):
    folder, _ = saved_model(SITE)
    reference, bfloat16 = reference_images(SITE)
    pipe = offloaded(folder, config, strategy)
    before = stored_state(pipe.transformer)

    first = fill(pipe)
    held = stored_state(pipe.transformer)
    second = fill(pipe)

    [incident] = first.guard_report.incidents
    assert (incident.module, incident.strategy, incident.recovered) == (INJECTED, strategy, True)
    assert all_finite(first.images) and psnr(first.images, reference) > psnr(bfloat16, reference) + 10.0
    # Later steps and calls run on what the hooks bring in: the fixed weights, no new incident.
    assert second.guard_report.incidents == []
    np.testing.assert_array_equal(second.images, first.images)
    changed = {name for name in before if held[name] != before[name]}
    if strategy == "rescale":  # the producer's rows and its consumer's columns, where the hook loads from
        assert {name.rsplit(".", 2)[-2] for name in changed} == {"proj_mlp", "proj_out"}
        assert all(held[name][:2] == before[name][:2] for name in before)  # no dtype changed
    else:  # float32 where the values live, or on the meta parameters the hook casts its copies to
        assert changed and all(held[name][0] == torch.float32 for name in changed)
    pipe.guard.reset()
    assert stored_state(pipe.transformer) == before


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_to_disk_changes_no_weight_and_leaves_its_files_alone(
    saved_model, tmp_path, offload_type
):
    """Its hooks reload every weight from disk at each forward: a fix on the module would be undone.
    At block level upcast and rescale decline, naming why; at leaf level the overflowing layer's own
    hook reloads it in float16 under the diagnosis' float32 run, and the diagnosis fails, reported."""
    folder, _ = saved_model(SITE)
    pipe = offloaded(folder, "model", "upcast")  # a plan to apply below
    fill(pipe)
    plan = pipe.guard.plan()
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=1.0)
    blocks = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.transformer.enable_group_offload(
        CPU, offload_type=offload_type, offload_to_disk_path=str(tmp_path), **blocks
    )
    pipe.guard.strategies = [s for s in pipe.guard.strategies if s.name in ("upcast", "rescale")]
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    dtypes = {name: t.dtype for name, t in pipe.transformer.state_dict().items()}

    with pytest.raises(NonFiniteError) as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16's NaN cast, as in plain diffusers
        fill(pipe)
    with pytest.raises(ValueError, match="reloads its weights from the files of offload_to_disk_path"):
        pipe.guard.apply_plan(plan)

    [incident] = raised.value.report.incidents
    if offload_type == "block_level":
        assert incident.module == INJECTED
        assert [(a.strategy, a.outcome) for a in incident.attempts] == [
            ("upcast", "declined"),
            ("rescale", "declined"),
        ]
        assert all(
            "reloads its weights from the files of offload_to_disk_path" in a.detail
            for a in incident.attempts
        )
    else:
        assert incident.detail.startswith("the diagnosis raised RuntimeError") and incident.attempts == []
    assert pipe.guard.fixes == []
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files
    assert {name: t.dtype for name, t in pipe.transformer.state_dict().items()} == dtypes
