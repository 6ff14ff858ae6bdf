"""`compress inspect`: what is inside a checkpoint (tensors, dtypes, sizes, quantization), read from headers
and small tensors only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from compress.formats.base import dtype_name
from compress.formats.checkpoint import weight_file_bytes
from compress.formats.gguf_reader import GGUFReader
from compress.formats.inputs import open_checkpoint
from compress.formats.quantized import DequantizingReader, format_of
from compress.quant.int4 import Int4Tensor
from compress.quant.nf4 import NF4Tensor


def describe_quantized(qt: Any) -> str:
    """'nf4 b64 +dq', 'int4 g128 asym', or the type's name."""
    if isinstance(qt, NF4Tensor):
        return f"{qt.quant_type} b{qt.block_size}" + (" +dq" if qt.double_quant else "")
    if isinstance(qt, Int4Tensor):
        return f"int4 g{qt.group_size} {'sym' if qt.symmetric else 'asym'}"
    return type(qt).__name__


def _group(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = {}
    for r in rows:
        g = groups.setdefault(r[key], {"tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += r["bytes"]
    return groups


def inspect_checkpoint(path: Path, *, list_tensors: bool) -> dict[str, Any]:
    """The summary ``compress inspect`` shows (``tensor_list`` only with ``list_tensors``)."""
    with open_checkpoint(path) as raw:
        fmt = format_of(raw)
        qconfig = (raw.config or {}).get("quantization_config")
        reader = DequantizingReader(raw, fmt) if fmt is not None else None
        stored = raw.infos()
        rows = []
        stored_bytes = {i.name: i.nbytes for i in stored}
        stored_dtypes = {i.name: dtype_name(i.dtype) for i in stored}
        infos = reader.infos() if reader else stored
        gguf_file = raw if isinstance(raw, GGUFReader) else None
        for info in infos:
            if gguf_file is not None:  # a GGUF's tensors are read as float32; show what the file stores
                _gguf_name, qtype, nbytes = gguf_file.stored(info.name)
                desc = "" if qtype in ("F32", "F16", "BF16") else qtype
                rows.append({"name": info.name, "shape": list(info.shape), "dtype": qtype.lower(),
                             "quantization": desc, "bytes": nbytes})
                continue
            if reader is not None and reader.is_quantized(info.name):
                qt = reader.quantized(info.name)
                keys = reader.format.stored_keys(info.name, set(stored_bytes))
                desc = describe_quantized(qt)
                nbytes = sum(stored_bytes[k] for k in keys)
                # what the file stores: packed codes (int32, uint8), scales, zeros, g_idx
                dtype = "+".join(sorted({stored_dtypes[k] for k in keys}))
            else:
                desc, nbytes, dtype = "", info.nbytes, dtype_name(info.dtype)
            rows.append({"name": info.name, "shape": list(info.shape), "dtype": dtype, "quantization": desc,
                         "bytes": nbytes})
        params = sum(math.prod(r["shape"]) for r in rows)
        total_bytes = weight_file_bytes(raw)  # on disk, as quantize reports it
        q_rows = [r for r in rows if r["quantization"]]
        return {
            "path": str(path), "format": "gguf" if gguf_file is not None else (fmt.name if fmt else "float"),
            "quantization_config": qconfig, "model_type": (raw.config or {}).get("model_type"),
            "tensors": len(rows), "parameters": params, "bytes": total_bytes,
            "bits_per_parameter": 8 * total_bytes / params if params else 0.0,
            "quantized_tensors": len(q_rows), "quantized_parameters": sum(math.prod(r["shape"]) for r in q_rows),
            "by_dtype": _group(rows, "dtype"), "by_quantization": _group(q_rows, "quantization"),
            "tensor_list": rows if list_tensors else None,
        }
