"""Reading checkpoints that hold quantized weights (our outputs, or any checkpoint in a layout of
the ``FORMATS`` registry) as float checkpoints, one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.formats import FORMATS, detect_format
from compress.formats.base import WeightFormat, parse_dtype
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.quant.base import QuantizedTensor

# config.json quantization_config.quant_method -> our layout name
QUANT_METHOD_TO_FORMAT = {"bitsandbytes": "bnb", "gptq": "gptq", "compress": "native",
                          "compressed-tensors": "compressed-tensors"}


def model_dtype(config: dict[str, Any] | None, default: torch.dtype = torch.float16) -> torch.dtype:
    """The dtype a config.json declares ('dtype' or the older 'torch_dtype')."""
    name = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    try:
        return parse_dtype(name) if name else default
    except ValueError:
        return default


class DequantizingReader(CheckpointReader):
    """Presents a quantized checkpoint as float tensors: each quantized weight ``P.weight`` appears
    once, with its original shape and dtype, and ``get`` dequantizes it; other tensors pass through."""

    def __init__(self, inner: CheckpointReader, fmt: WeightFormat) -> None:
        self.inner = inner
        self.format = fmt
        self.path = inner.path
        config = dict(inner.config or {})
        self.quantization_config: dict[str, Any] = dict(config.pop("quantization_config", None) or {})
        self.config = config
        self.dtype = model_dtype(inner.config)
        raw = inner.infos()
        keys = {i.name for i in raw}
        self._members: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        for w in fmt.weight_names(keys):
            members = fmt.stored_keys(w, keys)
            self._members[w] = members
            for k in members:
                owner[k] = w
        self._infos: list[TensorInfo] = []
        stored_shapes = {i.name: i.shape for i in raw}
        seen: set[str] = set()
        for info in raw:
            w = owner.get(info.name)
            if w is None:
                self._infos.append(info)
            elif w not in seen:
                seen.add(w)
                try:  # from small tensors only: the codes are read when the weight is asked for
                    shape, dtype = fmt.original_shape(w, {k: stored_shapes[k] for k in self._members[w]},
                                                      inner.get)
                except (KeyError, ValueError) as e:
                    raise InputError(f"cannot decode quantized weight '{w}' ({e})", where=str(self.path),
                                     fix="The checkpoint is corrupt or in an unsupported variant of the layout.") from e
                self._infos.append(TensorInfo(w, shape, dtype or self.dtype, info.file))

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def is_quantized(self, name: str) -> bool:
        return name in self._members

    def stored_infos(self) -> list[TensorInfo]:
        return self.inner.infos()

    def quantized(self, name: str) -> QuantizedTensor:
        tensors = {k: self.inner.get(k) for k in self._members[name]}
        try:
            return self.format.unpack(name, tensors, self.quantization_config, self.dtype)
        except (KeyError, ValueError, RuntimeError) as e:
            raise InputError(f"cannot decode quantized weight '{name}' ({e})", where=str(self.path),
                             fix="The checkpoint is corrupt or in an unsupported variant of the layout.") from e

    def get(self, name: str) -> torch.Tensor:
        if name in self._members:
            return self.quantized(name).dequantize()
        return self.inner.get(name)

    def extra_files(self) -> dict[str, bytes | Path]:
        return self.inner.extra_files()

    def close(self) -> None:
        self.inner.close()


def format_of(reader: CheckpointReader) -> WeightFormat | None:
    """The quantized layout of an opened checkpoint, from its config or (failing that) its keys."""
    qc = (reader.config or {}).get("quantization_config")
    if isinstance(qc, dict):
        fmt = FORMATS.get(QUANT_METHOD_TO_FORMAT.get(str(qc.get("quant_method")), ""))
        if isinstance(fmt, WeightFormat):
            return fmt
    return detect_format({i.name for i in reader.infos()})
