"""Calibration: run the pipeline in float32 on sample calls, tracing every stage's component.

Each stage component (``core.stages``: text encoders, the denoiser, ``vae.encoder`` and
``vae.decoder``) gets a ``Tracer`` for the duration of each of its calls: entered in a forward
pre-hook, left in the forward hook, so the pipeline's own ``__call__`` runs untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.stages import discover_stages, resolve_component
from .cuts import CutFinder
from .graph import Tracer, is_norm, norm_epsilon

Call = dict[str, Any]


def stage_roots(pipe: Any) -> dict[str, nn.Module]:
    """The modules the pipeline calls, by component path (``vae.decoder``), once each."""
    roots: dict[str, nn.Module] = {}
    for stage in discover_stages(pipe):
        module = resolve_component(pipe, stage.component)
        if module is not None and all(module is not seen for seen in roots.values()):
            roots[stage.component] = module
    return roots


def run_images(pipe: Any, calls: Sequence[Call]) -> list[np.ndarray]:
    """The pipeline's images (``output_type="np"``), one array per call, each call's generator fresh."""
    images = []
    for call in calls:
        arguments = dict(call)
        seed = arguments.pop("seed", 0)
        arguments.setdefault("generator", None)
        arguments["generator"] = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            images.append(np.asarray(pipe(**arguments, output_type="np").images, dtype=np.float64))
    return images


@contextlib.contextmanager
def tracing(roots: dict[str, nn.Module], finder: CutFinder) -> Iterator[None]:
    """Within: every call of each root (``stage_roots(pipe)``, or any modules by name) is traced."""
    handles: list[Any] = []
    tracers: list[Tracer] = []
    active: list[Tracer] = []

    def install(path: str, root: nn.Module) -> None:
        tracer = Tracer(root, path)
        tracers.append(tracer)
        eps = {
            f"{path}.{name}" if name else path: norm_epsilon(module)
            for name, module in root.named_modules()
            if is_norm(module)
        }

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if active:  # a stage inside another (not in diffusers' pipelines): the outer one traces it
                return
            tracer.call_started(args, kwargs)
            tracer.__enter__()
            active.append(tracer)

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not active or active[-1] is not tracer:
                return
            tracer.__exit__(None, None, None)
            active.pop()
            finder.add(tracer.call_finished(output))
            finder.add_norm_stats(tracer.norm_stats, eps)
            tracer.norm_stats.clear()

        handles.append(root.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(root.register_forward_hook(after, with_kwargs=True))

    for path, root in roots.items():
        install(path, root)
    try:
        yield
    finally:
        while active:
            active.pop().__exit__(None, None, None)
        for handle in handles:
            handle.remove()
        for tracer in tracers:
            tracer.remove()


@dataclasses.dataclass
class Calibration:
    """What a float32 run on the calibration calls saw: the cuts and the reference images."""

    finder: CutFinder
    images: list[np.ndarray]


def calibrate(pipe: Any, calls: Sequence[Call], progress: Callable[[str], None] | None = None) -> Calibration:
    """Run ``calls`` on the float32 ``pipe`` with every stage traced."""
    finder = CutFinder()
    images = []
    with tracing(stage_roots(pipe), finder):
        for index, call in enumerate(calls):
            images += run_images(pipe, [call])
            if progress:
                progress(f"calibration call {index + 1}/{len(calls)}")
    return Calibration(finder, images)
