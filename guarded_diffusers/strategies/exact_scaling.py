"""Multiply a tensor by a power of two in place, in its own dtype, and undo it bit for bit.

A power of two changes only exponents, so the product is exact unless it leaves the dtype's
normal range: a float16 weight scaled below 2**-14 becomes subnormal and loses bits (below 2**-25,
zero); one scaled past 65504 becomes inf. Those elements, and only those, keep their original
values (with their flat positions, on the host: nothing is added to the accelerator's memory);
every other element comes back exactly when multiplied by the inverse power.
"""

from __future__ import annotations

import dataclasses

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, as an integer view (float8 has no CPU kernels for most operations)."""
    return tensor.view(_BITS[tensor.element_size()])


def _times(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor * factor`` rounded once into the tensor's dtype (float32's product is exact)."""
    return (tensor.float() * factor).to(tensor.dtype)


@dataclasses.dataclass(eq=False)
class ScaledTensor:
    """A tensor multiplied by ``2**exponent`` in place; ``original`` holds what did not scale exactly."""

    tensor: torch.Tensor
    exponent: int
    index: torch.Tensor  # flat positions whose scaled value is not exact, on the host
    original: torch.Tensor  # their bits before scaling, on the host

    @property
    def inexact(self) -> int:
        """Elements the scaled dtype could not hold exactly (float16 subnormals, zeros or infs)."""
        return self.index.numel()

    @property
    def kept_bytes(self) -> int:
        """Host bytes kept to restore the inexact elements."""
        return (
            self.index.numel() * self.index.element_size()
            + self.original.numel() * self.original.element_size()
        )

    @torch.no_grad()
    def restore(self) -> None:
        """The tensor's original bits: the inverse power everywhere, the kept values where it was inexact."""
        _bits(self.tensor).copy_(_bits(_times(self.tensor, 2.0**-self.exponent)))
        if self.index.numel():
            flat = _bits(self.tensor).view(-1)
            flat[self.index.to(flat.device)] = self.original.to(flat.device)


@torch.no_grad()
def scale_exactly(tensor: torch.Tensor, exponent: int) -> ScaledTensor:
    """Multiply ``tensor`` (contiguous, floating) by ``2**exponent`` in place, reversibly."""
    scaled = _times(tensor, 2.0**exponent)
    inexact = _bits(_times(scaled, 2.0**-exponent)) != _bits(tensor)
    index = inexact.view(-1).nonzero().flatten()
    original = _bits(tensor).view(-1)[index].cpu()
    index = index.to(torch.int32 if tensor.numel() < 2**31 else torch.int64).cpu()
    _bits(tensor).copy_(_bits(scaled))
    return ScaledTensor(tensor, exponent, index, original)
