"""One Flux Fill call as plain values, so it prints readably, replays exactly and saves as PNGs."""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from .recipes import recipe


@dataclasses.dataclass(frozen=True, repr=False)
class FillInputs:
    """Arguments of one FluxFillPipeline call; ``seed`` feeds the torch generator.

    hypothesis does not manage torch's random state, so the noise comes from a generator seeded
    with a drawn integer: the same example gives the same latents on every replay. ``lora_scale``,
    when set, scales the loaded LoRA for this call (``joint_attention_kwargs={"scale": ...}``).
    """

    prompt: str
    image: Image.Image
    mask_image: Image.Image
    height: int
    width: int
    guidance_scale: float
    num_inference_steps: int
    strength: float
    num_images_per_prompt: int
    max_sequence_length: int
    seed: int
    lora_scale: float | None = None

    def _shown_fields(self) -> list[str]:
        """``name=value`` per field, pictures as the recipe calls that built them; unset options left out."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            shown.append(f"{field.name}={recipe(value) if isinstance(value, Image.Image) else repr(value)}")
        return shown

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._shown_fields())})"

    def pretty(self) -> str:
        """One field a line, as a failing item shows the shrunk example."""
        fields = "".join(f"    {shown},\n" for shown in self._shown_fields())
        return f"{type(self).__name__}(\n{fields})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """hypothesis prints a falsifying example through this, one field per line."""
        with printer.group(indent=4, open=f"{type(self).__name__}(", close=")"):
            for index, shown in enumerate(self._shown_fields()):
                if index:
                    printer.text(",")
                printer.breakable()
                printer.text(shown)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the pipeline, with a fresh generator seeded from ``seed``."""
        import torch

        arguments = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        seed = arguments.pop("seed")
        lora_scale = arguments.pop("lora_scale")
        if lora_scale is not None:
            arguments["joint_attention_kwargs"] = {"scale": lora_scale}
        return {**arguments, "generator": torch.Generator().manual_seed(seed)}
