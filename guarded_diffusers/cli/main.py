"""The fluxguard command: guarded diffusers pipelines from the shell, and a float16 headroom scan.

``fluxguard fill`` inpaints with GuardedFluxFillPipeline and prints what the guard did.
``fluxguard generate`` does the same with any pipeline folder (text to image, image to image,
Kontext, inpainting), the folder's pipeline class deciding the inputs.
``fluxguard scan`` runs generated inputs through a model in float32, records every module's
largest output and input, and says which modules run close to the working dtype's limit, with a
precision plan that fixes them before the first step. ``fluxguard bake`` writes a float16-safe copy
of a pipeline folder, exact power-of-two rescales baked into its weights; ``fluxguard bake-lora``
scales a LoRA trained on the original weights to match.
``python -m guarded_diffusers.cli`` is the same command; ``accelerate launch -m guarded_diffusers.cli
scan ...`` splits a scan across processes.
Each subcommand's module is imported only when it runs, so ``fill`` never loads accelerate.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..core.options import DEFAULT_MAX_EXTRA_MEMORY
from .inputs import UsageError, in_command_terms, non_negative, positive_int, sequence_length

DTYPES = ("float16", "bfloat16", "float32")
SCAN_DTYPES = ("float16", "bfloat16")  # recorded in float32, so only narrower dtypes can be judged
DEVICES = ("auto", "cpu", "cuda", "mps")
# The guard's own order (guarded_diffusers.core.plugins.DEFAULT_STRATEGIES, which imports torch).
DEFAULT_STRATEGIES = "guidance,upcast,rescale,stream_rescale,residual,clamp"

FILL_HELP = """\
Guarded inpainting: non-finite stages are found and recovered; prints the guard's incidents.

MODEL is a folder saved with save_pretrained() (model_index.json at its root). Without MODEL,
fill builds the bundled model: a tiny random Flux Fill pipeline with an injected float16
overflow, so the guard has something to show; it runs offline in seconds, with a built-in
32x32 sample image, mask and prompt unless you give your own.

examples:
  fluxguard fill -o out/fill.png
  fluxguard fill ./flux-fill --image cup.png --mask cup-mask.png --prompt "a paper cup" -o cup.png
  fluxguard fill ./flux-fill --plan scan/plan.json --image cup.png --mask cup-mask.png --prompt "" -o cup.png
"""

GENERATE_HELP = """\
Guarded generation with any diffusers pipeline folder; prints the guard's incidents.

MODEL is a folder saved with save_pretrained(); its model_index.json names the pipeline class,
which decides the inputs: a text-to-image pipeline takes --prompt, image to image and Kontext
--image too, inpainting --image and --mask. Options the pipeline's call does not take are not
passed on. Without MODEL, generate builds the bundled model: a tiny random Flux text-to-image
pipeline with an injected float16 overflow; it runs offline in seconds.

examples:
  fluxguard generate -o out/generate.png
  fluxguard generate ./sdxl --prompt "a paper cup" --height 1024 --width 1024 -o cup.png
  fluxguard generate ./flux-kontext --image cup.png --prompt "make it red" -o red-cup.png
"""

SCAN_HELP = """\
Record headroom per module in float32; mark the modules close to the dtype's limit; plan fixes.

Writes DIR/report.json (modules sorted by headroom = log2(dtype max / absmax) of their output
or input, those under the margin marked at risk; the residual stream's blocks and stream spans),
DIR/plan.json (float32 islands within --max-extra-memory, else residual fixes; use it with
guard_plan= or fill --plan), DIR/report.html (chart and tables, no network needed) and
DIR/headroom.png. MODEL is any diffusers pipeline folder; samples come from
pytest_fluxguard.strategies.call_inputs, shaped by the pipeline's call (text to image draws no
image or mask) and drawn the same way every time.

examples:
  fluxguard scan ./flux-fill --samples 16 --out scan
  accelerate launch --num_processes 2 -m guarded_diffusers.cli scan ./flux-fill --samples 16 --out scan
"""

BAKE_HELP = """\
Write a float16-safe copy of a pipeline folder: exact power-of-two rescales baked into the weights.

Tensors read only by normalisations (Flux's and T5's residual streams, a VAE resnet's conv1
output, ...) are found by tracing the pipeline in float32 on calibration calls drawn like the
scan's; each that would pass float16's range gets the smallest 2**-k at all its writers that
leaves 3 bits of headroom. OUT loads with plain from_pretrained(OUT, torch_dtype=torch.float16):
same tensor names, shapes and config, the scales in OUT/fluxguard-bake.json. OUT is written only
if the baked pipeline's float32 images reach 80 dB PSNR against the original's and, in float16,
are at least as faithful as the original's float16 and bfloat16 images. Overflows inside a layer
have no exact rescale: they are named, and the command exits 1 unless --allow-remaining (--plan
adds the precision plan for the guarded pipeline as OUT/fluxguard-plan.json).

examples:
  fluxguard bake ./flux-fill ./flux-fill-fp16safe
  fluxguard bake ./flux-fill ./flux-fill-fp16safe --variant fp16 --allow-remaining --plan
"""

BAKE_LORA_HELP = """\
Scale a LoRA trained on the original weights for a baked folder (fluxguard bake).

A baked layer's weight is the original times a power of two (OUT/fluxguard-bake.json); a LoRA on
it needs the same factor: each B matrix (and LoRA bias) of a scaled layer takes it, every other
tensor is copied as is, so the baked LoRA on the baked folder computes what the LoRA did on the
original (powers of two are exact in float32). LORA is a .safetensors file or a folder holding
pytorch_lora_weights.safetensors, in any format the pipeline's load_lora_weights reads; the output
is in diffusers' format, for load_lora_weights. A key whose layer the baked model lacks is an error.
The guarded pipelines do this by themselves when loaded from a baked folder.

examples:
  fluxguard bake-lora ./my-lora --like ./flux-fill-fp16safe -o ./my-lora-fp16safe
  fluxguard bake-lora style.safetensors --like ./flux-fill-fp16safe --variant fp16 -o style-fp16.safetensors
"""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr; ``--help`` returns from ``main`` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _common(parser: argparse.ArgumentParser, dtypes: tuple[str, ...]) -> None:
    parser.add_argument(
        "--dtype", choices=dtypes, default="float16", help="working dtype (default: %(default)s)"
    )
    parser.add_argument(
        "--max-sequence-length",
        type=sequence_length,
        default=512,
        metavar="TOKENS",
        help="T5 prompt length, 1 to 512 (default: %(default)s, as Flux dev)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to run; auto picks cuda if present"
    )


def _guarded_run(parser: argparse.ArgumentParser) -> None:
    """Options of every command that runs a guarded pipeline: its report, plan, strategies, budget, seed."""
    parser.add_argument("--report", type=Path, metavar="REPORT.json", help="write the guard report as JSON")
    parser.add_argument(
        "--plan", type=Path, metavar="PLAN.json", help="precision plan to apply before the first step"
    )
    parser.add_argument(
        "--strategies",
        metavar="LIST",
        help="recovery strategies in order, comma-separated, or 'none' to only detect "
        f"(default: the guard's, {DEFAULT_STRATEGIES})",
    )
    parser.add_argument(
        "--max-extra-memory",
        type=non_negative,
        default=DEFAULT_MAX_EXTRA_MEMORY,
        metavar="FRACTION",
        help=(
            "parameter bytes the guard's fixes and --plan may add, as a fraction of the pipeline's "
            "(default: %(default)s); load a scan's plan with the budget it was made for"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="noise seed (default: %(default)s)")


def _subcommand(commands: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose first paragraph of ``text`` is its summary and the rest its epilog."""
    summary, _, epilog = text.partition("\n\n")
    return commands.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fluxguard", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{fill,generate,scan,bake,bake-lora}"
    )

    fill = _subcommand(commands, "fill", FILL_HELP)
    fill.add_argument(
        "model",
        nargs="?",
        type=Path,
        metavar="MODEL",
        help="Flux Fill model folder (default: bundled tiny model)",
    )
    fill.add_argument("--image", type=Path, metavar="IN", help="picture to inpaint")
    fill.add_argument(
        "--mask", type=Path, metavar="MASK", help="white where to paint, same size as the image"
    )
    fill.add_argument("--prompt", metavar="TEXT", help="what to paint")
    fill.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.png", help="image to write")
    _guarded_run(fill)
    fill.add_argument(
        "--steps", type=positive_int, default=28, metavar="N", help="denoising steps (default: %(default)s)"
    )
    fill.add_argument(
        "--guidance",
        type=non_negative,
        default=30.0,
        metavar="SCALE",
        help="guidance scale, a finite number >= 0 (default: %(default)s)",
    )
    _common(fill, DTYPES)
    fill.set_defaults(run="fill")

    generate = _subcommand(commands, "generate", GENERATE_HELP)
    generate.add_argument(
        "model",
        nargs="?",
        type=Path,
        metavar="MODEL",
        help="any diffusers pipeline folder (default: bundled tiny Flux text-to-image model)",
    )
    generate.add_argument("--prompt", metavar="TEXT", help="what to draw")
    generate.add_argument(
        "--image", type=Path, metavar="IN", help="picture to start from (image to image, Kontext, inpainting)"
    )
    generate.add_argument("--mask", type=Path, metavar="MASK", help="white where to paint (inpainting)")
    generate.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT.png", help="image to write"
    )
    generate.add_argument("--height", type=positive_int, metavar="PX", help="(default: the pipeline's)")
    generate.add_argument("--width", type=positive_int, metavar="PX", help="(default: the pipeline's)")
    _guarded_run(generate)
    generate.add_argument(
        "--steps", type=positive_int, metavar="N", help="denoising steps (default: the pipeline's)"
    )
    generate.add_argument(
        "--guidance", type=non_negative, metavar="SCALE", help="guidance scale (default: the pipeline's)"
    )
    _common(generate, DTYPES)
    generate.set_defaults(run="generate")

    scan = _subcommand(commands, "scan", SCAN_HELP)
    scan.add_argument("model", type=Path, metavar="MODEL", help="any diffusers pipeline folder")
    scan.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the report and plan")
    scan.add_argument(
        "--samples", type=positive_int, default=8, metavar="N", help="generated inputs (default: %(default)s)"
    )
    scan.add_argument(
        "--margin",
        type=non_negative,
        default=1.0,
        metavar="BITS",
        help="at risk below this headroom (default: %(default)s)",
    )
    scan.add_argument(
        "--max-size",
        type=positive_int,
        default=256,
        metavar="PX",
        help="largest generated side (default: %(default)s)",
    )
    scan.add_argument(
        "--max-steps",
        type=positive_int,
        default=4,
        metavar="N",
        help="most generated steps (default: %(default)s)",
    )
    scan.add_argument(
        "--max-guidance",
        type=non_negative,
        default=30.0,
        metavar="SCALE",
        help=(
            "largest generated guidance (default: %(default)s, FluxFill's default); above 32.75 the "
            "transformer's guidance x 1000 has under 1 bit of float16 headroom and the plan adds "
            "the guidance fix"
        ),
    )
    scan.add_argument(
        "--max-extra-memory",
        type=non_negative,
        default=DEFAULT_MAX_EXTRA_MEMORY,
        metavar="FRACTION",
        help=(
            "parameter bytes the plan's float32 islands may add, as a fraction of the pipeline's "
            "(default: %(default)s, the guard's guard_max_extra_memory); past it the plan uses "
            "residual, which adds none"
        ),
    )
    _common(scan, SCAN_DTYPES)
    scan.set_defaults(run="scan")

    bake = _subcommand(commands, "bake", BAKE_HELP)
    bake.add_argument(
        "src", type=Path, metavar="SRC", help="diffusers pipeline folder (float32 or half weights)"
    )
    bake.add_argument(
        "out", type=Path, metavar="OUT", help="folder to write, a copy of SRC with baked weights"
    )
    bake.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    bake.add_argument(
        "--variant", choices=("fp16",), help="keep the original weights; add baked float16 *.fp16.safetensors"
    )
    bake.add_argument("--allow-remaining", action="store_true", help="write OUT even if overflows remain")
    bake.add_argument("--plan", action="store_true", help="write the precision plan for what remains")
    bake.add_argument(
        "--samples",
        type=positive_int,
        default=2,
        metavar="N",
        help="calibration calls (default: %(default)s)",
    )
    bake.add_argument(
        "--max-size", type=positive_int, default=64, metavar="PX", help="largest side (default: %(default)s)"
    )
    bake.add_argument(
        "--max-steps", type=positive_int, default=2, metavar="N", help="most steps (default: %(default)s)"
    )
    bake.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to calibrate; auto picks cuda if present"
    )
    bake.set_defaults(run="bake")

    bake_lora = _subcommand(commands, "bake-lora", BAKE_LORA_HELP)
    bake_lora.add_argument(
        "lora", type=Path, metavar="LORA", help="LoRA .safetensors file, or a folder holding one"
    )
    bake_lora.add_argument(
        "--like", type=Path, required=True, metavar="OUT", help="the baked pipeline folder the LoRA is for"
    )
    bake_lora.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUT_LORA",
        help="a .safetensors file to write, or a folder for pytorch_lora_weights.safetensors",
    )
    bake_lora.add_argument("--overwrite", action="store_true", help="replace OUT_LORA if it exists")
    bake_lora.add_argument(
        "--variant", choices=("fp16",), help="the LoRA is for from_pretrained(OUT, variant=...)"
    )
    bake_lora.set_defaults(run="bake-lora")
    return parser


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    """No log record below ERROR while the libraries import: installed optional backends (torchao,
    bitsandbytes) announce on import what they cannot load, which says nothing about this command."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _run(args: argparse.Namespace) -> int:
    with _quiet_imports():
        if args.run == "fill":
            from .fill import run_fill as run
        elif args.run == "generate":
            from .generate import run_generate as run
        elif args.run == "bake":
            from .bake import run_bake_command as run
        elif args.run == "bake-lora":
            from .bake_lora import run_bake_lora_command as run
        else:
            from .scan import run_scan_command as run
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; 0 on success, 1 when the guard gave up, 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
    except _Exit as stop:
        return stop.status
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        return _run(args)
    except UsageError as error:
        print(f"fluxguard {args.command}: error: {in_command_terms(str(error))}", file=sys.stderr)
        return 2
