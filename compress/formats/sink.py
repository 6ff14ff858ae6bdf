"""The seam between the executor and the writers: encoded tensors in, one file layout out.

A task returns each tensor it produces as an :class:`Encoded` value: the stored bytes (a 1-D uint8
numpy array, exactly what goes on disk) with the dtype name and shape they claim. Bytes cross process
and machine boundaries cheaply (a worker, a Ray node), and the writer can check the claim against what
was declared before it writes a byte.

Every writer is a :class:`Sink` with one shape: the tensors are *declared* when the sink is made (so that
headers, shard layouts and offsets are known before any data exists), then *written* once each in the
declared order, then the sink is *committed* (the output appears atomically) or *aborted* (nothing is left).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Encoded:
    """One stored tensor as bytes: ``data`` uint8 [nbytes], a numpy array, or a CPU torch tensor (how a local
    worker process hands bytes over: through shared memory, not through a pipe); ``dtype`` a torch dtype name
    ('bfloat16') or a GGML type name ('q4_k'); ``shape`` the logical shape (torch order)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | torch.Tensor

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def array(self) -> np.ndarray:
        """The bytes as a numpy array (no copy)."""
        return self.data.numpy() if isinstance(self.data, torch.Tensor) else self.data

    def shared(self) -> Encoded:
        """The same bytes in a torch tensor, which multiprocessing sends between local processes through shared
        memory (one copy) instead of pickling it through a pipe."""
        return self if isinstance(self.data, torch.Tensor) else Encoded(self.dtype, self.shape,
                                                                          torch.from_numpy(self.data))


def encode(tensor: torch.Tensor) -> Encoded:
    """The bytes of ``tensor`` as stored in safetensors (little-endian, row-major); leaves the device once."""
    flat = tensor.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).to("cpu").numpy() if flat.numel() else np.zeros(0, np.uint8)
    return Encoded(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), data)


def encode_packed(packed: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> Encoded:
    """Already-packed bytes (a uint8 tensor of any shape) of a tensor of logical ``dtype`` and ``shape``."""
    return Encoded(dtype, tuple(shape), packed.detach().contiguous().reshape(-1).to("cpu").numpy())


def decode(encoded: Encoded) -> torch.Tensor:
    """The torch tensor behind ``encoded`` (torch dtypes only)."""
    dtype = getattr(torch, encoded.dtype)
    data = encoded.array()
    if data.size == 0:
        return torch.empty(encoded.shape, dtype=dtype)
    return torch.from_numpy(data.copy()).view(dtype).reshape(encoded.shape)


class Sink(ABC):
    """Declare (in the constructor) / write / commit / abort. A context manager that aborts unless committed."""

    committed = False

    @abstractmethod
    def write(self, name: str, tensor: Encoded) -> None:
        """Write the next declared tensor (names and order as declared)."""

    @abstractmethod
    def commit(self) -> None:
        """Finish the files and make the output appear (atomically)."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written so far."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()
