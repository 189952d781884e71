"""The bake block by block (baking.streamed): the in-memory bake's result, one block in memory at a time.

A 12B Flux transformer does not fit a 24 GB machine in float32; streamed, each residual block reads
its weights from the folder's files just before its forward. Every run of the bake (calibration,
the original in float16 and bfloat16, the baked float32 and float16 checks) must go that way and
give the same figures and the same files as the bake of the pipeline loaded whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxFillPipeline
from torch import nn

from guarded_diffusers.baking.run import bake
from guarded_diffusers.baking.samples import scan_calls
from guarded_diffusers.baking.streamed import load_streamed
from guarded_diffusers.baking.write import write_baked
from guarded_diffusers.cli.main import main
from guarded_diffusers.core.stream import residual_blocks
from guarded_diffusers.testing import sample_inputs, save_tiny_pipeline

CALL = {**sample_inputs(32), "num_inference_steps": 2, "max_sequence_length": 32, "guidance_scale": 30.0}
SITES = ("double_block_ff_residual", "vae_decoder")


@dataclasses.dataclass
class Watch:
    """What the global module hooks saw: block forwards with weights, and blocks holding them when
    they should not (outside their forward, or two at once)."""

    blocks: list[tuple[weakref.ref, frozenset[int]]] = dataclasses.field(default_factory=list)
    loaded_forwards: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)

    def held(self) -> list[tuple[nn.Module, frozenset[int]]]:
        alive = [(ref(), inside) for ref, inside in self.blocks]
        return [
            (block, inside)
            for block, inside in alive
            if block is not None and any(not p.is_meta for p in block.parameters())
        ]


@contextlib.contextmanager
def watching() -> Iterator[Watch]:
    """Within: every module call checks that at most one residual block holds real tensors, the one
    it runs in; the blocks are those of every module the pipeline calls (copies included)."""
    watch, depth, known = Watch(), [0], weakref.WeakSet()

    def check(module: nn.Module, when: str) -> None:
        held = watch.held()
        if len(held) > 1 or any(id(module) not in inside for _, inside in held):
            watch.violations.append(f"{when} {type(module).__name__}: {len(held)} blocks hold weights")

    def before(module: nn.Module, args: tuple) -> None:
        if depth[0] == 0 and module not in known:  # a component the pipeline calls
            known.add(module)
            for block in residual_blocks(module):
                inside = frozenset(id(m) for m in block.modules())
                watch.blocks.append((weakref.ref(block), inside))
        depth[0] += 1
        check(module, "before")

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        depth[0] -= 1
        check(module, "after")  # global hooks run before the block's own: it still holds them here
        if any(block is module for block, _ in watch.held()):
            watch.loaded_forwards += 1

    handles = [
        nn.modules.module.register_module_forward_pre_hook(before),
        nn.modules.module.register_module_forward_hook(after),
    ]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()
    if watch.held():
        watch.violations.append(f"after the bake, {len(watch.held())} blocks hold weights")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=SITES)
def bakes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(root, in-memory result, streamed result, the streamed bake's Watch) per site, both written."""
    root = tmp_path_factory.mktemp(f"streamed-{request.param}")
    save_tiny_pipeline(root / "src", request.param)
    whole = bake(FluxFillPipeline.from_pretrained(root / "src", dtype=torch.float32), [CALL])
    write_baked(root / "src", root / "whole", whole)
    streamed = load_streamed(root / "src")
    with watching() as watch:
        result = bake(streamed.pipe, [CALL], weights=streamed)
    write_baked(root / "src", root / "streamed", result)
    return root, whole, result, watch


def test_the_streamed_bake_is_the_in_memory_bake(bakes: tuple):
    """Same cuts, k, exponents, subnormal counts and self-check figures (float64 PSNRs, equal only if
    every image is), and byte-identical written files."""
    root, whole, streamed, _ = bakes
    assert whole.scaled, "the site needs a cut scaled"
    assert json.dumps(streamed.to_dict()) == json.dumps(whole.to_dict())
    assert _files(root / "streamed") == _files(root / "whole")


def test_a_streamed_bake_holds_one_block_at_a_time(bakes: tuple):
    """Every block of every component (and of every half-precision copy) holds real tensors only
    within its own forward."""
    *_, watch = bakes
    assert watch.violations == []
    # transformer (3 blocks), CLIP and T5 (2 each), VAE encoder and decoder (5 each): every run streams.
    assert len(watch.blocks) >= 17 and watch.loaded_forwards >= 5 * 17


def test_the_command_bakes_block_by_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``fluxguard bake`` streams, and writes what the in-memory bake of the same calls writes."""
    save_tiny_pipeline(tmp_path / "src", "double_block_ff_residual")
    pipe = FluxFillPipeline.from_pretrained(tmp_path / "src", dtype=torch.float32)
    calls = scan_calls(pipe, samples=1, max_size=32, max_steps=2)
    write_baked(tmp_path / "src", tmp_path / "expected", bake(pipe, calls))
    sampling = ["--samples", "1", "--max-size", "32", "--max-steps", "2"]
    with watching() as watch:
        status = main(["bake", str(tmp_path / "src"), str(tmp_path / "cli"), *sampling])
    assert status == 0, capsys.readouterr().err
    assert watch.violations == [] and watch.loaded_forwards > 0
    assert _files(tmp_path / "cli") == _files(tmp_path / "expected")
