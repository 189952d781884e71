"""Plumbing shared by the benchmark scripts: offline quiet loading, call arguments, counters, memory.

Importing this module sets the offline/quiet environment before diffusers is imported. The
package is expected installed (``make bench`` installs this checkout in editable mode).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_name, _value)

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import DiffusionPipeline, FluxFillPipeline  # noqa: E402
from torch import nn  # noqa: E402

from guarded_diffusers import DegradedFixWarning, GuardedFluxFillPipeline, guard  # noqa: E402
from guarded_diffusers.testing import sample_inputs  # noqa: E402

MAX_SEQUENCE_LENGTH = 32


def quiet() -> None:
    """Silence progress bars, library logging and known warnings: the scripts print tables only.

    The guard logs under diffusers' logger, so its incident warnings go quiet too; the scripts
    read incidents from the report.
    """
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)
    # Plain float16 pipelines turn NaN into images on purpose; numpy's cast warning is expected.
    warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning)
    # Degraded incidents are tabulated from the report; the warning would repeat them.
    warnings.filterwarnings("ignore", category=DegradedFixWarning)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch threads, by default as many as the process may use."""
    parser.add_argument(
        "--threads",
        type=int,
        default=available_cpus(),
        help="torch threads (default: CPUs available)",
    )


def machine_summary() -> str:
    """One line naming the software and CPU budget a figure was measured with."""
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}; {platform.machine()} {available_cpus()} CPU(s), "
        f"torch threads {torch.get_num_threads()}"
    )


def load(path: str | Path, dtype: torch.dtype, guarded: bool = False) -> FluxFillPipeline:
    """Load a saved pipeline in ``dtype``, plain or guarded, with its progress bar off."""
    cls = GuardedFluxFillPipeline if guarded else FluxFillPipeline
    pipe = cls.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(
    path: str | Path, dtype: torch.dtype, guarded: bool = False, force_upcast: bool = False
) -> Any:
    """Load any saved pipeline in ``dtype``, guarded in place with ``guard(pipe)`` if asked.

    In float16 every module runs in float16: SDXL's ``force_upcast`` (decode with the whole VAE in
    float32) is turned off unless ``force_upcast``.
    """
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.float16 and not force_upcast:
        pipe.vae.register_to_config(force_upcast=False)
    return guard(pipe) if guarded else pipe


def call_kwargs(size: int = 32, seed: int = 0, steps: int = 4, **overrides: Any) -> dict[str, Any]:
    """Arguments of one pipeline call: ``seed`` draws both the input image and the generator."""
    return {
        **sample_inputs(size=size, seed=seed),
        "num_inference_steps": steps,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
        **overrides,
    }


def generate(pipe: FluxFillPipeline, size: int = 32, seed: int = 0, steps: int = 4, **overrides: Any) -> Any:
    """One call of ``pipe`` with ``call_kwargs`` (``overrides`` replace any of them); the output."""
    return pipe(**call_kwargs(size, seed, steps, **overrides))


class ForwardCounter:
    """Counts calls of one module: ``started`` by a pre-hook, ``completed`` by a forward hook.

    Both are needed because the guard's diagnostic re-run raises out of the component at the
    first non-finite submodule: it starts a forward that never completes.
    """

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self.started += 1

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.completed += 1

    @contextlib.contextmanager
    def watching(self, module: nn.Module) -> Iterator[ForwardCounter]:
        """Count ``module``'s calls inside the block; the hooks are removed on exit."""
        handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def module_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module``."""
    return sum(tensor.numel() * tensor.element_size() for tensor in (*module.parameters(), *module.buffers()))


def parameter_bytes(pipe: Any) -> int:
    """Bytes held by the parameters and buffers of every component that is a module: the pipeline's memory."""
    return sum(module_bytes(c) for c in pipe.components.values() if isinstance(c, nn.Module))


# Wall-clock is the figure users feel; process CPU time ignores the time this process waits for a
# core, so on a shared machine it is the steadier of the two (exactly so with one torch thread).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clocked(call: Callable[[], Any]) -> dict[str, float]:
    """Seconds ``call`` takes on each of ``CLOCKS``."""
    starts = {name: clock() for name, clock in CLOCKS.items()}
    call()
    return {name: clock() - starts[name] for name, clock in CLOCKS.items()}


def interleaved_rounds(
    arms: dict[str, Callable[[], Any]], rounds: int, budget: float
) -> tuple[dict[str, list[Any]], int]:
    """What each call of each arm returns (its own timings), in rounds of the palindrome of ``arms``.

    A palindrome (A B C C B A) lets slow drifts of a shared machine hit every arm alike; rounds stop
    at ``rounds`` or once the next one would end past ``budget`` seconds, two rounds at least.
    Garbage is collected before every call. Returns the values per arm and the number of rounds.
    """
    order = [*arms, *reversed(arms)]
    values: dict[str, list[Any]] = {arm: [] for arm in arms}
    start, done = time.perf_counter(), 0
    gc.collect()
    gc.freeze()  # what exists now is not garbage: the collections between calls skip it
    try:
        while done < rounds:
            round_start = time.perf_counter()
            for arm in order:
                gc.collect()
                values[arm].append(arms[arm]())
            done += 1
            now = time.perf_counter()
            if done >= 2 and now + (now - round_start) - start > budget:
                break
    finally:
        gc.unfreeze()
    return values, done


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[int]]:
    """Counts ``Tensor.item`` and ``Tensor.tolist`` calls (every device value read on the host) inside
    the block: ``[count]``. On a GPU each one is a synchronisation."""
    counts = [0]
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist")}

    def counted(original: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
