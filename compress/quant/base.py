"""What every quantizer returns and every format writer accepts.

A quantizer is a pure function ``quantize(W, config) -> QuantizedTensor`` (float32 inside, no file
or device decisions) and ``QuantizedTensor.dequantize()`` gives back ``W'`` in the caller's dtype.
Packing into bytes belongs to the formats (``compress.formats``), not here: codes are kept one
per uint8 so that every writer can lay them out as its target expects.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from compress.metrics import CHUNK_ELEMENTS, ErrorMetrics, compare_stream


@dataclass
class QuantizedTensor(ABC):
    """A quantized weight. ``shape`` and ``dtype`` are those of the original tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    # Elements a dequantized piece must start and end on (a block, a row); see dequantize_range.
    @property
    def chunk_unit(self) -> int:
        return self.numel

    @abstractmethod
    def dequantize_range(self, start: int, stop: int) -> torch.Tensor:
        """float32 [stop - start]: elements ``start:stop`` of the flattened W', both multiples of
        :attr:`chunk_unit` (``stop`` may also be ``numel``)."""

    def dequantize_chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
        """W' flattened, in float32 pieces of about ``max_elements`` (whole units), in order: what a
        reconstruction costs in memory is one piece, not a float32 copy of the tensor."""
        unit = max(self.chunk_unit, 1)
        step = max(max_elements // unit, 1) * unit
        for start in range(0, self.numel, step):
            yield self.dequantize_range(start, min(start + step, self.numel))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct W' with the original shape, in ``dtype`` (default: the original dtype): computed in
        float32 piece by piece, each element rounded once to ``dtype``."""
        device = self.device
        out = torch.empty(self.numel, dtype=dtype or self.dtype, device=device)
        start = 0
        for piece in self.dequantize_chunks():
            out[start:start + piece.numel()] = piece
            start += piece.numel()
        return out.reshape(self.shape)

    def error_against(self, W: torch.Tensor) -> ErrorMetrics:
        """:func:`~compress.metrics.compare` of W' against ``W``, without a full float32 copy of W'."""
        return compare_stream(W, self.dequantize_chunks())

    @property
    def device(self) -> torch.device:
        tensors = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        return tensors[0].device if tensors else torch.device("cpu")

    @abstractmethod
    def storage_bits(self) -> int:
        """Bits needed to store this tensor in its natural packed form (codes + statistics)."""

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits() / max(self.numel, 1)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every tensor field moved to ``device``."""
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return type(self)(**fields)


def check_float_matrix(W: torch.Tensor, what: str = "W") -> None:
    """Quantizers accept float16/bfloat16/float32 tensors; anything else is a programming error."""
    if W.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {W.dtype}")
