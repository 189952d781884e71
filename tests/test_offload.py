"""Offloading: fixes made through the offload hooks, and offloaded copies put back exactly on reset.

Each configuration is what diffusers or accelerate install, run on the CPU (the onload device is the
CPU here, so the hooks run and move nothing between devices; CUDA streams cannot be made without a
GPU). The guard must fix the overflow so that the weights each hook brings in are the fixed ones,
and ``reset()`` must restore the copies the hooks load from bit for bit: the model's own tensors,
accelerate's ``weights_map`` (parameters on the meta device), the files of group offloading to disk.
``residual`` and ``clamp`` hold hooks, not weights: they must compute with what the hooks bring in
and leave every stored value alone.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from conftest import all_finite, fill, hook_count, load

from guarded_diffusers import GuardedFluxFillPipeline, NonFiniteError
from guarded_diffusers.core.fidelity import psnr

SITE = "single_block_mlp"
INJECTED = "transformer.single_transformer_blocks.0.proj_mlp"
CPU = torch.device("cpu")
# The hook-only strategies, each on a site it fits, and what comes of its first incident: residual
# needs a residual-stream site; clamp on the single block's feed-forward measures far from float32.
HOOK_FIXES = {"residual": ("double_block_ff_residual", "applied"), "clamp": (SITE, "degraded")}


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


def quietly(call: Callable[[], object]) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16's NaN cast, a DegradedFixWarning
        return call()


def offloaded(folder, config: str | None, strategy: str, offload: Callable[..., None] | None = None):
    """The guarded pipeline with ``strategy`` alone, offloaded by ``CONFIGS[config]`` or ``offload``."""
    pipe = load(GuardedFluxFillPipeline, folder, torch.float16, guard_max_extra_memory=1.0)
    if offload is None and config is not None:
        offload = CONFIGS[config]
    if offload is not None:
        offload(pipe)
    pipe.guard.strategies = [s for s in pipe.guard.strategies if s.name == strategy]
    return pipe


def to_disk(offload_type: str, path: Path) -> Callable[..., None]:
    """Group offloading of the transformer to files under ``path``, one block per group at block level."""
    blocks = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    return lambda pipe: pipe.transformer.enable_group_offload(
        CPU, offload_type=offload_type, offload_to_disk_path=str(path), **blocks
    )


@functools.cache
def unoffloaded(folder: Path, strategy: str) -> np.ndarray:
    """The image the guard gives with ``strategy`` alone and no offloading."""
    return quietly(lambda: fill(offloaded(folder, None, strategy))).images


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


@pytest.mark.parametrize("strategy", list(HOOK_FIXES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_hook_fix_acts_on_what_the_offload_hooks_load_and_changes_no_stored_weight(
    saved_model, reference_images, config, strategy
):
    """residual recomputes its producer after the forward, when accelerate has put the weights back
    on the meta device (was: "Tensor on device meta"); both must give the image they give unoffloaded."""
    site, outcome = HOOK_FIXES[strategy]
    folder, injected = saved_model(site)
    reference, bfloat16 = reference_images(site)
    pipe = offloaded(folder, config, strategy)
    before, hooks = stored_state(pipe.transformer), hook_count(pipe)

    first = quietly(lambda: fill(pipe))
    held = stored_state(pipe.transformer)
    second = quietly(lambda: fill(pipe))

    incident = first.guard_report.incidents[0]
    assert (incident.module, incident.strategy) == (injected, strategy)
    assert [attempt.outcome for attempt in incident.attempts] == [outcome]
    assert incident.recovered == (outcome == "applied") and incident.degraded == (outcome == "degraded")
    assert all_finite(first.images)
    if strategy == "residual":  # later incidents of the site degrade alone: the image is still far better
        assert psnr(first.images, reference) > psnr(bfloat16, reference) + 10.0
    else:  # clamp's honest outcome: finite, below bfloat16
        assert psnr(first.images, reference) < psnr(bfloat16, reference)
    np.testing.assert_array_equal(first.images, unoffloaded(folder, strategy))
    assert second.guard_report.incidents == []
    np.testing.assert_array_equal(second.images, first.images)
    assert held == before and hook_count(pipe) > hooks  # hooks added, not a stored bit changed
    pipe.guard.reset()
    assert stored_state(pipe.transformer) == before and hook_count(pipe) == hooks


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
    to_disk(offload_type, tmp_path)(pipe)
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


@pytest.mark.parametrize("strategy", list(HOOK_FIXES))
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_a_hook_fix_under_group_offloading_to_disk_leaves_its_files_alone(
    saved_model, tmp_path, offload_type, strategy
):
    """At block level the fix's hooks run inside the group's forward, with its weights loaded: the
    image is the unoffloaded one, but the float32 reference of a measured block cannot run (the group
    reloads float16 from disk), so clamp stays unmeasured. At leaf level the diagnosis fails; a plan's
    clamp holds, its residual entry is refused: the layer's weights are emptied before the hook that
    recomputes from them runs."""
    site, _ = HOOK_FIXES[strategy]
    folder, injected = saved_model(site)
    pipe = offloaded(folder, None, strategy, to_disk(offload_type, tmp_path))
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    dtypes = {name: t.dtype for name, t in pipe.transformer.state_dict().items()}
    hooks = hook_count(pipe)
    assert files  # written when offloading was enabled

    if offload_type == "block_level":
        output = quietly(lambda: fill(pipe))
        incident = output.guard_report.incidents[0]
        assert (incident.module, incident.strategy) == (injected, strategy)
        np.testing.assert_array_equal(output.images, unoffloaded(folder, strategy))
        [attempt] = incident.attempts
        if strategy == "residual":
            assert attempt.outcome == "applied" and incident.recovered
        else:
            assert attempt.outcome == "unmeasured" and attempt.detail.startswith("its measurement raised")
            assert incident.degraded and not incident.recovered
        assert output.guard_report.degraded  # residual: the site's later incidents, unmeasured
        assert quietly(lambda: fill(pipe)).guard_report.incidents == []
    else:
        with pytest.raises(NonFiniteError) as raised:
            quietly(lambda: fill(pipe))
        [incident] = raised.value.report.incidents
        assert incident.detail.startswith("the diagnosis raised RuntimeError") and incident.attempts == []
        source = offloaded(folder, None, strategy)  # a plan made without offloading
        quietly(lambda: fill(source))
        if strategy == "residual":
            with pytest.raises(ValueError, match="its weights are emptied as soon as its forward returns"):
                pipe.guard.apply_plan(source.guard.plan())
        else:  # a hook on the layer's output, nothing reloaded: the plan's clamp holds
            pipe.guard.apply_plan(source.guard.plan())
            output = quietly(lambda: fill(pipe))
            assert output.guard_report.incidents == []
            np.testing.assert_array_equal(output.images, unoffloaded(folder, strategy))

    pipe.guard.reset()
    assert pipe.guard.fixes == [] and hook_count(pipe) == hooks
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files
    assert {name: t.dtype for name, t in pipe.transformer.state_dict().items()} == dtypes
