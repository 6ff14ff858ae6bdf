"""`compress quantize --format gguf`: one llama.cpp file, with the same accuracy report as the folder layouts.

The weights go to ``OUT.gguf`` (written by :func:`~compress.formats.gguf_writer.export_gguf` under a
temporary name and renamed on success); the report and the provenance go beside it as
``OUT.report.json``, ``OUT.report.md`` and ``OUT.provenance.json`` (a GGUF file has no folder to
hold them, and run-specific details must stay out of the weights so that they are byte-identical
between runs).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import OptionError, OutputError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.gguf_writer import PlannedTensor, export_gguf, llama_params, plan_tensors
from compress.metrics import ErrorMetrics
from compress.pipeline.report import KeptRow, QuantizeReport, TensorRow

Progress = Callable[[str, int], None]


def sidecar_paths(out: Path) -> dict[str, Path]:
    """The files written beside ``OUT.gguf``."""
    stem = out.name.removesuffix(".gguf")
    return {"report_json": out.with_name(f"{stem}.report.json"), "report_md": out.with_name(f"{stem}.report.md"),
            "provenance": out.with_name(f"{stem}.provenance.json")}


def check_gguf_output(out: Path, *, force: bool, inputs: list[Path]) -> None:
    """Refuse a GGUF output that is not a .gguf path, overlaps an input, or exists without --force."""
    if out.suffix != ".gguf":
        raise OptionError(f"--format gguf writes one file: {out} must end in .gguf",
                          fix="Pass -o MODEL.gguf (the report goes beside it as MODEL.report.md).")
    out_abs = out.resolve()
    for src in inputs:
        src_abs = src.resolve()
        if out_abs == src_abs or src_abs in out_abs.parents:
            raise OutputError(f"output {out} overlaps the input {src}", fix="Choose a different output path.")
    for path in (out, *sidecar_paths(out).values()):
        if path.is_dir():
            raise OutputError(f"output {path} is a folder", fix="Remove it or choose another output path.")
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputError(f"output {path} already exists",
                              fix="Pass --force to replace it, or choose another path.")


def plan_gguf(reader: CheckpointReader, method: str) -> tuple[list[PlannedTensor], list[str]]:
    """What each tensor becomes in the file (GGUF name, type, bytes), without reading any data."""
    infos = reader.infos()
    return plan_tensors(infos, llama_params(reader.config, infos, str(reader.path)), method, None, str(reader.path))


def _kept_reason(qtype: str) -> str:
    if qtype == "f32":
        return "F32: llama.cpp keeps norms and 1-D tensors in float32"
    return "F16: rows are not whole 32-element blocks"


def quantize_to_gguf(reader: CheckpointReader, out: Path, method: str, *, force: bool,
                     progress: Progress | None = None, quantized: Any = None) -> QuantizeReport:
    """Write ``reader``'s model to ``out`` in ``method`` (a llama.cpp file type) and measure every stored tensor.
    ``quantized``: export_gguf's hook for tensors the caller quantizes itself."""
    result = export_gguf(reader, out, method, force=force, measure=True, progress=progress, quantized=quantized)
    infos = {i.name: i for i in reader.infos()}
    report = QuantizeReport(method=method, parameters={"method": method, "block_size": 32}, format="gguf",
                            bytes_before=sum(i.nbytes for i in infos.values()), bytes_after=result["bytes"],
                            notes=list(result["notes"]))
    for t in result["tensors"]:
        source = t["source"]
        if source is None:  # generated (rope_freqs)
            continue
        info = infos[source]
        dtype = str(info.dtype).removeprefix("torch.")
        if "metrics" in t:
            metrics = ErrorMetrics(**t["metrics"])
            report.quantized.append(TensorRow(source, tuple(info.shape), dtype, 8 * t["bytes"] / math.prod(info.shape),
                                              metrics, note=f"{t['type']} as {t['name']}"))
        else:
            report.kept.append(KeptRow(source, tuple(info.shape), dtype, _kept_reason(t["type"].lower())))
    by_type = ", ".join(f"{k} {v['tensors']}" for k, v in result["by_type"].items())
    report.notes.append(f"GGUF tensor types: {by_type}")
    return report


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
