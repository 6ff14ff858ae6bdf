"""What an on-disk quantized weight layout must provide.

A :class:`WeightFormat` turns a :class:`~compress.quant.base.QuantizedTensor` into the named
tensors its target loader expects (``pack``), declares them before any data exists
(``packed_specs``, so that shards can be laid out and a dry run can print exact sizes), reads them
back (``unpack``), and writes the ``quantization_config`` that goes into config.json.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from compress.formats.writer import TensorSpec
from compress.quant.base import QuantizedTensor


class ExportFormat:
    """An entry of the ``--format`` registry: a name, the methods it can hold, and its container.

    ``container`` is ``"folder"`` for layouts inside a Hugging Face checkpoint folder (the
    :class:`WeightFormat` subclasses, written by the streaming shard writer) and ``"file"`` for
    single-file formats with their own writer (GGUF).
    """

    name: str
    summary: str
    methods: tuple[str, ...]  # quantization methods this format can hold
    container: str = "folder"


class WeightFormat(ExportFormat, ABC):
    """A registered layout for quantized Linear weights inside a Hugging Face checkpoint folder."""

    container = "folder"
    # Whether the layout stores a float offset per group (W' = s q + m) instead of an integer zero point:
    # the grid optimiser may then choose any offset.
    float_offsets = False

    def adapt_config(self, config: Any, dtype: torch.dtype) -> Any:
        """The method config this layout needs for a model whose weights are ``dtype`` (e.g. scales
        rounded to the dtype the loader casts them into). Unchanged by default."""
        return config

    @abstractmethod
    def unsupported(self, shape: tuple[int, ...], config: Any) -> str | None:
        """Why a weight of this shape cannot be stored (then it is kept in float), or None."""

    @abstractmethod
    def packed_specs(self, weight_name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     config: Any) -> list[TensorSpec]:
        """The stored tensors for one quantized weight, in writing order."""

    @abstractmethod
    def pack(self, weight_name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Stored tensors for ``qt`` (same names and order as ``packed_specs``)."""

    @abstractmethod
    def quantization_config(self, config: Any, dtype: torch.dtype, kept_modules: list[str],
                            quantized_modules: list[str]) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""

    # Suffixes of the tensors stored for module P in place of P.weight (P.qweight, P.scales, ...); the
    # first one is always present and marks the module as quantized. Layouts that store under other
    # names (bitsandbytes keeps P.weight) override weight_names and stored_keys instead.
    parts: tuple[str, ...] = ()

    def weight_names(self, keys: set[str]) -> list[str]:
        """Names of the original weights (``P.weight``) stored quantized among ``keys``."""
        marker = "." + self.parts[0]
        return sorted(k.removesuffix(marker) + ".weight" for k in keys if k.endswith(marker))

    def stored_keys(self, weight_name: str, keys: set[str]) -> list[str]:
        """All stored keys that belong to the quantized weight ``weight_name``."""
        p = module_name(weight_name)
        return [f"{p}.{part}" for part in self.parts if f"{p}.{part}" in keys]

    @abstractmethod
    def original_shape(self, weight_name: str, stored_shapes: dict[str, tuple[int, ...]],
                       read: Callable[[str], torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype | None]:
        """Shape (and dtype, if stored) of the original weight, reading at most small tensors."""

    @abstractmethod
    def unpack(self, weight_name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
               dtype: torch.dtype) -> QuantizedTensor:
        """Rebuild the quantized tensor from its stored tensors."""


def module_name(weight_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'."""
    return weight_name.removesuffix(".weight")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
