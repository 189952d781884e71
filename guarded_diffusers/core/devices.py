"""The device name "auto" means CUDA when this machine has it, else the CPU."""

from __future__ import annotations


def resolve_device(name: str) -> str:
    """``name``, with ``auto`` made concrete; torch is imported here so callers stay light to import."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
