"""The plugin's command-line options, their ini twins, and the checked values they resolve to.

Each option is declared once and registered twice (``--fluxguard-x`` and ini ``fluxguard_x``);
the command line wins over the ini file, the ini file over the default. Values are parsed and
checked at start-up, so a typo fails with a usage error naming the option before any model loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GROUP = "fluxguard"
DTYPES = ("float16", "bfloat16", "float32")
MODES = ("raw", "guarded")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclasses.dataclass(frozen=True)
class FluxGuardOptions:
    """What the plugin was asked to do, with paths resolved and every value checked."""

    model: Path | None
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    examples: int
    max_size: int | None  # None: 16 latent patches, 2 * vae_scale_factor * 16 (256 px for Flux)
    max_steps: int
    max_sequence_length: int
    max_guidance: float | None  # None: 100, raw items capped where the dtype cannot carry guidance x 1000
    min_psnr: float | None
    artifacts: Path
    device: str
    loras: tuple[Path, ...] = ()
    max_lora_scale: float = 1.5
    max_shrinks: int = 50
    baked: Path | None = None
    original: Path | None = None


@dataclasses.dataclass(frozen=True)
class _Option:
    field: str
    metavar: str
    default: str
    help: str

    @property
    def flag(self) -> str:
        return "--fluxguard-" + self.field.replace("_", "-")

    @property
    def ini(self) -> str:
        return "fluxguard_" + self.field


_OPTIONS = (
    _Option("model", "PATH", "", "diffusers model folder (model_index.json at its root) to fuzz."),
    _Option("dtype", "LIST", "float16,bfloat16", f"Comma-separated dtypes to test, of {', '.join(DTYPES)}."),
    _Option("mode", "LIST", "raw,guarded", "Comma-separated modes: raw (the pipeline as it ships), guarded."),
    _Option("examples", "N", "10", "Hypothesis examples per item (and per fluxguard-marked @given test)."),
    _Option(
        "max_size",
        "PX",
        "",
        "Largest generated height and width, in pixels (default 16 latent patches: 256 for Flux).",
    ),
    _Option("max_steps", "N", "4", "Most inference steps a generated example asks for."),
    _Option(
        "max_sequence_length", "TOKENS", "512", "T5 prompt length the pipeline is called with (Flux dev 512)."
    ),
    _Option(
        "max_guidance",
        "SCALE",
        "",
        "Largest generated guidance_scale (default 100; raw float16 items 65.5, where diffusers' "
        "guidance x 1000 still fits). Given, every item draws up to it.",
    ),
    _Option("min_psnr", "DB", "", "Guarded items also fail below this PSNR against the float32 output."),
    _Option(
        "artifacts", "DIR", ".fluxguard", "Folder for the PNGs of failing examples (output, mask, image)."
    ),
    _Option(
        "device", "NAME", "auto", f"Device to run on, of {', '.join(DEVICES)}; auto picks cuda if present."
    ),
    _Option("lora_scale", "MAX", "1.5", "Largest LoRA scale drawn for --fluxguard-lora items (from 0)."),
    _Option(
        "max_shrinks",
        "N",
        "50",
        "Pipeline calls an item spends shrinking, per distinct failure (0: report each as found).",
    ),
    _Option(
        "baked",
        "PATH",
        "",
        "A folder fluxguard bake wrote: one item runs its baked weights in float16 with plain diffusers "
        "and fails unless its pixels are finite and as faithful to the original in float32 as bfloat16.",
    ),
    _Option(
        "original",
        "PATH",
        "",
        "The folder --fluxguard-baked was baked from (default: the baked folder's own default weights, "
        "where the bake is a variant: fluxguard bake --variant fp16).",
    ),
)
_LORA = _Option(
    "lora",
    "PATH",
    "",
    "A LoRA (folder for pipe.load_lora_weights) to fuzz on --fluxguard-model; repeat for more. "
    "Items per LoRA x dtype x mode replace the model's own.",
)


def add_options(parser: pytest.Parser) -> None:
    """Register every option in the ``fluxguard`` group and its ini twin."""
    group = parser.getgroup(GROUP, "fluxguard: fuzz a diffusers model for non-finite pixels")
    for option in _OPTIONS:
        group.addoption(option.flag, dest=option.ini, metavar=option.metavar, default=None, help=option.help)
        parser.addini(option.ini, option.help, type="string", default=option.default)
    group.addoption(
        _LORA.flag, dest=_LORA.ini, metavar=_LORA.metavar, action="append", default=None, help=_LORA.help
    )
    parser.addini(_LORA.ini, _LORA.help + " One path a line.", type="linelist", default=[])


def _choices(option: str, allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(value: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise pytest.UsageError(
                f"{option} got {value!r}; expected a comma-separated list of {', '.join(allowed)}."
            )
        return names

    return parse


def check_dtypes(value: str | list[str] | tuple[str, ...], source: str) -> tuple[str, ...]:
    """Dtype names from an option string or a marker's list, checked against the supported ones."""
    text = value if isinstance(value, str) else ",".join(value)
    return _choices(source, DTYPES)(text)


def _bounded(option: str, kind: type, minimum: float) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number >= minimum:  # also rejects NaN
            raise pytest.UsageError(f"{option} got {value!r}; expected a {kind.__name__} >= {minimum}.")
        return number

    return parse


def _raw_value(config: pytest.Config, option: _Option) -> tuple[str, Path]:
    """The option's text and the folder a relative path in it is relative to.

    A command-line path is relative to where pytest was started; an ini path to the ini file.
    """
    value = config.getoption(option.ini)
    if value is not None:
        return value, config.invocation_params.dir
    base = config.inipath.parent if config.inipath else config.rootpath
    return config.getini(option.ini), base


def _loras(config: pytest.Config) -> tuple[Path, ...]:
    """--fluxguard-lora paths relative to the invocation directory, else the ini's relative to its file."""
    given = config.getoption(_LORA.ini)
    if given:
        base, paths = config.invocation_params.dir, given
    else:
        base = config.inipath.parent if config.inipath else config.rootpath
        paths = config.getini(_LORA.ini)
    return tuple(dict.fromkeys((base / path).resolve() for path in paths if path.strip()))


def _path(value: str, base: Path) -> Path | None:
    return (base / value).resolve() if value else None


def _optional(parse: Callable[[str], Any], value: str) -> Any:
    return parse(value) if value else None


def resolve(config: pytest.Config) -> FluxGuardOptions:
    """Read every option (command line, then ini, then default) and check it."""
    raw = {option.field: _raw_value(config, option) for option in _OPTIONS}
    flag = {option.field: option.flag for option in _OPTIONS}
    model, baked, original = (_path(*raw[field]) for field in ("model", "baked", "original"))
    artifacts, artifacts_base = raw["artifacts"]
    min_psnr = raw["min_psnr"][0]
    loras = _loras(config)
    if loras and not model:
        raise pytest.UsageError(
            f"{_LORA.flag} needs the base model: --fluxguard-model PATH (or fluxguard_model)."
        )
    if original and not baked:
        raise pytest.UsageError(f"{flag['original']} goes with {flag['baked']} PATH (or fluxguard_baked).")
    device = _choices(flag["device"], DEVICES)(raw["device"][0])
    if len(device) != 1:
        raise pytest.UsageError(f"{flag['device']} takes one device, got {raw['device'][0]!r}.")
    return FluxGuardOptions(
        model=model,
        dtypes=check_dtypes(raw["dtype"][0], flag["dtype"]),
        modes=_choices(flag["mode"], MODES)(raw["mode"][0]),
        examples=_bounded(flag["examples"], int, 1)(raw["examples"][0]),
        max_size=_optional(_bounded(flag["max_size"], int, 1), raw["max_size"][0]),
        max_steps=_bounded(flag["max_steps"], int, 1)(raw["max_steps"][0]),
        max_sequence_length=_bounded(flag["max_sequence_length"], int, 1)(raw["max_sequence_length"][0]),
        max_guidance=_optional(_bounded(flag["max_guidance"], float, 0.0), raw["max_guidance"][0]),
        min_psnr=_optional(_bounded(flag["min_psnr"], float, 0.0), min_psnr),
        artifacts=(artifacts_base / artifacts).resolve(),
        device=device[0],
        loras=loras,
        max_lora_scale=_bounded(flag["lora_scale"], float, 0.0)(raw["lora_scale"][0]),
        max_shrinks=_bounded(flag["max_shrinks"], int, 0)(raw["max_shrinks"][0]),
        baked=baked,
        original=original,
    )
