"""`compress dequantize`: a quantized checkpoint (any folder layout we write or read, or a GGUF file) back to a
float checkpoint folder, one tensor per task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.formats import FORMATS
from compress.formats.gguf_reader import GGUFReader
from compress.formats.inputs import open_model
from compress.formats.output import check_output, expect_output_bytes
from compress.formats.quantized import DequantizingReader
from compress.formats.writer import FolderSink, TensorSpec, write_model_files
from compress.pipeline.execute import execute
from compress.pipeline.run import RunOptions, write_provenance
from compress.pipeline.tasks import CopyTensor, ModelSource

DTYPES = ("original", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DequantizeRequest:
    model: Path
    out: Path
    dtype: str = "original"  # or the dtype of the dequantized weights
    shard_bytes: int = 5_000_000_000
    force: bool = False


def dequantize(request: DequantizeRequest, run: RunOptions) -> dict[str, Any]:
    """Write the float checkpoint; returns a summary (output, tensors, dequantized, bytes)."""
    check_output(request.out, force=request.force, inputs=[request.model])
    with open_model(request.model) as reader:
        is_gguf = isinstance(reader, GGUFReader)
        if not is_gguf and (not isinstance(reader, DequantizingReader)
                            or not any(reader.is_quantized(i.name) for i in reader.infos())):
            raise InputError("no quantized weights found", where=str(request.model),
                             fix="`compress dequantize` reads outputs of `compress quantize` (layouts: "
                                 f"{', '.join(FORMATS)}).")

        def is_quantized(name: str) -> bool:  # a GGUF's tensors are all decoded (to float32)
            return is_gguf or (isinstance(reader, DequantizingReader) and reader.is_quantized(name))

        dtype = None if request.dtype == "original" else getattr(torch, request.dtype)
        infos = reader.infos()
        specs = [TensorSpec(i.name, dtype if (dtype and is_quantized(i.name)) else i.dtype, i.shape) for i in infos]
        tasks = [CopyTensor(i.name, i.nbytes, "model", i.shape, i.dtype, cast_to=s.dtype)
                 for i, s in zip(infos, specs, strict=True)]
        expect_output_bytes(sum(s.nbytes for s in specs))
        run.start("dequantize", sum(i.nbytes for i in infos), len(tasks))
        with FolderSink(request.out, force=request.force, specs=specs, shard_bytes=request.shard_bytes) as sink:
            stats = execute(tasks, sink, lambda row: None, sources={"model": ModelSource(str(request.model))},
                    opened={"model": reader}, device=run.device, options=run.executor, progress=run.on_task)
            config = dict(reader.config or {})
            if config and dtype is not None:
                config["dtype"] = request.dtype
            write_model_files(sink.folder, config or None, reader.extra_files())
            write_provenance(sink.folder / "compress_provenance.json", run, "dequantize", request.model, request.out,
                             {"format": "gguf" if is_gguf else reader.format.name,  # type: ignore[attr-defined]
                              "dtype": request.dtype, "execution": stats.as_dict()})
            sink.commit()
    return {"output": str(request.out), "tensors": len(specs), "dequantized": sum(is_quantized(i.name) for i in infos),
            "bytes": sum(s.nbytes for s in specs)}
