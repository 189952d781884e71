"""safetensors files read and written one tensor at a time, with plain reads (no memory map).

The format: a little-endian 8-byte header length, a JSON header (per tensor its dtype, shape and
byte range after the header; ``__metadata__`` strings), then the tensors' bytes. Reading a tensor
with ``seek``/``readinto`` keeps only that tensor in memory; a memory map would keep every page it
touched resident in the process, which for a 10 GB shard is the shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
DTYPES = {name: dtype for dtype, name in NAMES.items()}


def read_header(file: BinaryIO) -> tuple[dict[str, Any], int]:
    """(header, offset of the first tensor byte) of an open safetensors file."""
    file.seek(0)
    (length,) = struct.unpack("<Q", file.read(8))
    return json.loads(file.read(length)), 8 + length


def tensors_of(header: dict[str, Any]) -> dict[str, Any]:
    return {key: entry for key, entry in header.items() if key != "__metadata__"}


@contextlib.contextmanager
def opened(paths: Iterable[Path]) -> Iterator[dict[str, tuple[BinaryIO, dict[str, Any], int]]]:
    """Within: every tensor of the files ``paths`` (one file or an index's shards) by name, as
    ``read_tensor``'s arguments; only the headers are read."""
    with contextlib.ExitStack() as stack:
        where = {}
        for path in paths:
            file = stack.enter_context(open(path, "rb"))
            header, start = read_header(file)
            where.update({key: (file, entry, start) for key, entry in tensors_of(header).items()})
        yield where


def read_tensor(file: BinaryIO, entry: dict[str, Any], start: int) -> torch.Tensor:
    """One tensor (``entry`` from the header) read into fresh memory."""
    begin, end = entry["data_offsets"]
    dtype = DTYPES[entry["dtype"]]
    tensor = torch.empty(math.prod(entry["shape"]), dtype=dtype)
    if end > begin:
        file.seek(start + begin)
        file.readinto(memoryview(tensor.view(torch.uint8).numpy()))
    return tensor.reshape(entry["shape"])


def write_streamed(
    target: Path,
    entries: Iterable[tuple[str, torch.dtype, list[int]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """``entries`` (name, dtype, shape) into ``target``; ``produce(name)`` gives each tensor in turn."""
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for key, dtype, shape in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or list(tensor.shape) != shape:
                raise ValueError(f"{key}: expected {dtype} {shape}, got {tensor.dtype} {list(tensor.shape)}")
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
