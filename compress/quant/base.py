"""What every quantizer returns and every format writer accepts.

A quantizer is a pure function ``quantize(W, config) -> QuantizedTensor`` (float32 inside, no file
or device decisions) and ``QuantizedTensor.dequantize()`` gives back ``W'`` in the caller's dtype.
Packing into bytes belongs to the formats (``compress.formats``), not here: codes are kept one
per uint8 so that every writer can lay them out as its target expects.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class QuantizedTensor(ABC):
    """A quantized weight. ``shape`` and ``dtype`` are those of the original tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct W' with the original shape, in ``dtype`` (default: the original dtype)."""

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
