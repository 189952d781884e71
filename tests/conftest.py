"""Shared fixtures: tiny Flux Fill pipelines saved to temp folders and loaded the way users load them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxFillPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from guarded_diffusers.testing import sample_inputs, save_tiny_pipeline

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

STEPS = 3


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, str | None]]:
    """``saved_model(site)`` -> (folder, first overflowing module); each model is built once per session."""
    cache: dict[tuple[str | None, int], tuple[Path, str | None]] = {}

    def get(site: str | None = None, seed: int = 0) -> tuple[Path, str | None]:
        if (site, seed) not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{site or 'clean'}-{seed}")
            cache[site, seed] = (folder, save_tiny_pipeline(folder, site, seed))
        return cache[site, seed]

    return get


@pytest.fixture(scope="session")
def reference_images(saved_model: Callable[..., tuple[Path, str | None]]) -> Callable[[str | None], tuple]:
    """``reference_images(site)`` -> (float32 images, bfloat16 images) of plain FluxFillPipeline, cached."""
    cache: dict[str | None, tuple[np.ndarray, np.ndarray]] = {}

    def get(site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if site not in cache:
            folder, _ = saved_model(site)
            cache[site] = tuple(
                fill(load(FluxFillPipeline, folder, dtype)).images
                for dtype in (torch.float32, torch.bfloat16)
            )
        return cache[site]

    return get


@pytest.fixture
def diffusers_warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], contextlib.AbstractContextManager]:
    """``with diffusers_warnings(): ...`` captures diffusers' warnings (the guard's log) in ``caplog``."""

    @contextlib.contextmanager
    def capturing() -> Iterator[None]:
        diffusers_logging.set_verbosity_warning()
        diffusers_logging.enable_propagation()
        try:
            with caplog.at_level(logging.WARNING, logger="diffusers"):
                yield
        finally:
            diffusers_logging.disable_propagation()
            diffusers_logging.set_verbosity_error()

    return capturing


def load(cls: type[FluxFillPipeline], folder: Path, dtype: torch.dtype, **kwargs: Any) -> Any:
    pipe = cls.from_pretrained(folder, torch_dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fill(pipe: FluxFillPipeline, seed: int = 0, **overrides: Any) -> Any:
    """One short fill call with fixed inputs; returns the pipeline output (numpy images)."""
    arguments: dict[str, Any] = {
        **sample_inputs(32, seed=seed),
        "num_inference_steps": STEPS,
        "max_sequence_length": 32,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }
    arguments.update(overrides)
    return pipe(**arguments)


def count_calls(module: torch.nn.Module) -> list[int]:
    """Counts forwards of ``module`` from now on, aborted ones too (a one-element list, read ``[0]``)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


def _modules(pipe: DiffusionPipeline) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]


def state_snapshot(pipe: FluxFillPipeline) -> dict[str, tuple[torch.dtype, bytes]]:
    """Every parameter and buffer of every component: dtype and raw bytes, for bit-exact comparison."""
    snapshot = {}
    for component, module in _modules(pipe):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            snapshot[f"{component}.{name}"] = (tensor.dtype, raw)
    return snapshot


def hook_count(pipe: FluxFillPipeline) -> int:
    """Forward hooks and pre-hooks left on any module of any component."""
    total = 0
    for _, component in _modules(pipe):
        for module in component.modules():
            total += len(module._forward_hooks) + len(module._forward_pre_hooks)
    return total


def all_finite(images: np.ndarray) -> bool:
    return bool(np.isfinite(images).all())


def run_fluxguard(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """The fluxguard command in this process: its exit status, stdout and stderr."""
    from guarded_diffusers.cli.main import main

    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err
