"""Run a headroom scan, on one process or split across the processes ``accelerate launch`` started.

Every process loads the model in float32 and draws the same samples; accelerate's process state
hands each process its share, and the per-sample records are gathered on the main process, which
merges them. Merging takes a maximum per module and a sum of calls over records sorted by sample,
so the merged statistics do not depend on how many processes recorded them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from pytest_fluxguard.calls import call_shape

from ..core.options import DEFAULT_MAX_EXTRA_MEMORY
from .headroom import AbsmaxRecorder, HeadroomScan, SampleRecord, merge
from .samples import draw_samples


@dataclasses.dataclass(frozen=True)
class ScanRequest:
    """What to scan and how the samples are drawn."""

    model: Path
    dtype: str
    samples: int
    margin_bits: float
    max_size: int
    max_steps: int
    max_sequence_length: int
    max_guidance: float
    device: str = "auto"
    # The fraction of the pipeline's parameter bytes plan fixes may add (the guard's default budget).
    max_extra_memory: float = DEFAULT_MAX_EXTRA_MEMORY


class SizeTooSmall(ValueError):
    """``max_size`` is below the smallest height and width the model takes."""


def process_state(device: str) -> tuple[PartialState, torch.device]:
    """accelerate's process state and this process's device.

    ``auto`` means the CPU under ``accelerate launch --cpu`` or without CUDA, else this process's
    GPU. accelerate only treats several launched processes as CPU workers (gloo) when told so.
    """
    if device == "auto":
        device = (
            "cpu" if parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available() else "cuda"
        )
    state = PartialState(cpu=device == "cpu")
    return state, state.device if device == "cuda" else torch.device(device)


def run_scan(request: ScanRequest) -> HeadroomScan | None:
    """The merged scan on the main process; ``None`` on the other processes."""
    state, device = process_state(request.device)
    pipe = DiffusionPipeline.from_pretrained(request.model, dtype=torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    shape = call_shape(pipe)
    multiple = shape.size_multiple
    if request.max_size < multiple:
        raise SizeTooSmall(
            f"--max-size {request.max_size} is below this model's smallest size, {multiple} px"
        )
    sampling = {
        "strategy": "pytest_fluxguard.strategies.call_inputs",
        "pipeline": type(pipe).__name__,
        "max_size": request.max_size,
        "multiple": multiple,
        "max_steps": request.max_steps,
        "max_images": 1,
        "max_sequence_length": request.max_sequence_length,
        "max_guidance": request.max_guidance,
    }
    examples = draw_samples(
        request.samples,
        shape=shape,
        max_size=request.max_size,
        max_steps=request.max_steps,
        max_sequence_length=request.max_sequence_length,
        max_guidance=request.max_guidance,
    )
    recorder = AbsmaxRecorder(pipe)
    records: list[SampleRecord] = []
    try:
        with state.split_between_processes(list(range(len(examples)))) as mine:
            for index in tqdm(mine, desc="scan", unit="sample", disable=not state.is_main_process):
                pipe(**examples[index].pipeline_kwargs(), output_type="np")
                records.append(recorder.take(index))
    finally:
        recorder.remove()
    gathered = gather_object(records)
    if not state.is_main_process:
        return None
    return merge(
        gathered,
        recorder.classes,
        model=str(request.model),
        dtype=request.dtype,
        margin_bits=request.margin_bits,
        sampling=sampling,
        layout=recorder.layout,
        max_extra_memory=request.max_extra_memory,
    )
