"""One pipeline call as plain values, so it prints readably, replays exactly and saves as PNGs."""

from __future__ import annotations

import dataclasses
from typing import Any

from PIL import Image

from .recipes import recipe


@dataclasses.dataclass(frozen=True, repr=False, kw_only=True)
class FillInputs:
    """Arguments of one pipeline call (named for Flux Fill, the first one fuzzed); ``seed`` feeds the
    torch generator. An argument the pipeline's call does not take stays None and is not passed:
    text to image has no ``image`` or ``mask_image``, Stable Diffusion no ``max_sequence_length``.

    hypothesis does not manage torch's random state, so the noise comes from a generator seeded
    with a drawn integer: the same example gives the same latents on every replay. ``lora_scale``,
    when set, scales the loaded LoRA for this call (``joint_attention_kwargs={"scale": ...}``).
    ``keep_size`` (Kontext) calls with ``max_area=height * width`` and ``_auto_resize=False``, so the
    output has the drawn size, not Kontext's default of about a megapixel.
    """

    prompt: str
    image: Image.Image | None = None
    mask_image: Image.Image | None = None
    height: int
    width: int
    guidance_scale: float
    num_inference_steps: int
    strength: float | None = None
    num_images_per_prompt: int
    max_sequence_length: int | None = None
    seed: int
    lora_scale: float | None = None
    keep_size: bool | None = None

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
        """Keyword arguments for the pipeline (those set), with a fresh generator seeded from ``seed``."""
        import torch

        arguments = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }
        seed = arguments.pop("seed")
        lora_scale = arguments.pop("lora_scale", None)
        if lora_scale is not None:
            arguments["joint_attention_kwargs"] = {"scale": lora_scale}
        if arguments.pop("keep_size", False):
            arguments.update(max_area=self.height * self.width, _auto_resize=False)
        return {**arguments, "generator": torch.Generator().manual_seed(seed)}
