"""A pipeline folder baked block by block: no component needs to fit in memory in float32.

``load_streamed(src)`` builds every model component that has residual blocks
(``core.stream.residual_blocks``: Flux's double and single blocks, T5's and CLIP's layers, a VAE's
up and down blocks) on the meta device, as diffusers and transformers would construct it, and
loads only its weights outside those blocks, in float32. ``bake(pipe, calls, weights=streamed)``
then reads the blocks from the folder's safetensors files just before each forward
(``blockwise.streamed_blocks``), in every run of the bake: calibration, the half-precision copies,
the baked checks. Every component with blocks is streamed, whatever its size: one code path for a
tiny test model and a 12B Flux, and peak memory is the weights outside the blocks, one block and
the activations, whatever the pipeline holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, ModelMixin
from torch import nn

from .apply import Scaling, subnormal_counts
from .blockwise import block_names, streamed_blocks
from .run import Exponents
from .tensorfile import opened, read_tensor
from .write import BakeWriteError, weight_files, weighted_components


@dataclasses.dataclass
class StreamedPipeline:
    """A float32 pipeline whose streamed components hold no block weights, and where those are.

    ``bake``'s ``Weights``: ``files`` maps each streamed component to its safetensors files.
    """

    pipe: Any
    files: dict[str, list[Path]]
    device: torch.device

    @contextlib.contextmanager
    def running(self, pipe: Any, exponents: Exponents) -> Iterator[None]:
        """Within: ``pipe`` (``self.pipe`` or a cast copy of it) streams every streamed component's blocks."""
        with contextlib.ExitStack() as stack:
            for component, files in self.files.items():
                module = getattr(pipe, component)
                stack.enter_context(streamed_blocks(module, files, exponents.get(component), self.device))
            yield

    def subnormals(self, scaling: Scaling) -> dict[str, int]:
        """Counted on the unscaled values, a block's tensors read from the files one at a time."""
        return subnormal_counts(self._unscaled(scaling))

    def _unscaled(self, scaling: Scaling) -> Iterator[tuple[torch.Tensor, int]]:
        for component, groups in scaling.aliases.items():
            module = getattr(self.pipe, component)
            tensors = dict(
                itertools.chain(
                    module.named_parameters(remove_duplicate=False),
                    module.named_buffers(remove_duplicate=False),
                )
            )
            with opened(self.files.get(component, [])) as where:
                for names in groups:
                    tensor = tensors[names[0]]
                    if tensor.is_meta:
                        tensor = read_tensor(*where[next(name for name in names if name in where)])
                    yield tensor, scaling.exponents[component][names[0]]


def load_streamed(
    src: Path, device: torch.device | str = "cpu", given: dict[str, nn.Module] | None = None
) -> StreamedPipeline:
    """The float32 pipeline in ``src``, every component with residual blocks streamed from its files.

    ``given`` components are used as they are, in memory (``src`` needs no weights for them): a
    transformer loaded from a single-file checkpoint.

    Raises ``BakeWriteError`` if a streamed component's files lack one of its tensors or hold one it
    does not have (a checkpoint that ``from_pretrained`` would convert).
    """
    index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    streamed: dict[str, nn.Module] = {}
    files: dict[str, list[Path]] = {}
    given = given or {}
    for name, stem in weighted_components(src):
        if name in given:
            continue
        model = _empty(src / name, *index[name])
        if not block_names(model):
            continue
        files[name] = weight_files(src / name, stem)
        _load_outside_blocks(model, files[name], device)
        streamed[name] = model.eval()
    pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32, **streamed, **given)
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module) and name not in files:
            component.to(device)
    return StreamedPipeline(pipe, files, torch.device(device))


def _empty(directory: Path, library: str, class_name: str) -> nn.Module:
    """The component built from its config on the meta device, as its library constructs it to load it."""
    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights():
        if issubclass(cls, ModelMixin):
            return cls.from_config(cls.load_config(directory))
        # transformers' own constructor for a config (``AutoModel.from_config`` calls it): it picks the
        # attention implementation as ``from_pretrained`` does; float32 whatever dtype the config names.
        return cls._from_config(cls.config_class.from_pretrained(directory), dtype=torch.float32)


def _load_outside_blocks(model: nn.Module, files: list[Path], device: torch.device | str) -> None:
    """Load every tensor of ``files`` outside ``model``'s residual blocks, in float32, onto ``device``."""
    inside = tuple(f"{name}." for name in block_names(model))
    with opened(files) as located:
        state = {
            key: _float32(read_tensor(*entry)).to(device)
            for key, entry in located.items()
            if not key.startswith(inside)
        }
        unread = [
            name for name, _ in model.named_parameters() if name.startswith(inside) and name not in located
        ]
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if hasattr(model, "tie_weights"):  # transformers ties T5's encoder.embed_tokens to shared
        model.tie_weights()
    model._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(device))  # buffers made at init
    missing = unread + [
        name
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
        if tensor.is_meta and not name.startswith(inside)
    ]
    if missing or unexpected:
        problem = f"lack {', '.join(missing[:3])}" if missing else f"hold unknown {', '.join(unexpected[:3])}"
        raise BakeWriteError(
            f"{files[0].parent}: its safetensors files {problem}: the bake reads them as they are"
        )


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor
