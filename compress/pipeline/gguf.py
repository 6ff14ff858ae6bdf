"""GGUF output: plan what each tensor becomes in a llama.cpp file, run it through the executor into a
:class:`~compress.formats.gguf_writer.GGUFSink`, and report.

The plan gives every tensor of a Llama checkpoint its llama.cpp name, its type and the Q/K permutation:

- a llama.cpp file type (``q4_0`` ... ``q8_0``, ``q4_k_s`` ... ``q6_k``) gives each 2-D weight the type
  ``llama-quantize`` would (:func:`~compress.quant.llama_cpp.llama_cpp_type`: the output and a tied embedding
  at Q6_K, the K-quant mixtures' attn_v/ffn_down, fallbacks where rows are not whole blocks), quantized by our
  bit-exact ports of llama.cpp's quantizers; the file is byte-identical to ``llama-quantize`` run on the F32
  export. ``f16`` / ``f32`` use their type everywhere. Norms and every 1-D tensor are F32, as llama.cpp
  requires. ``embeddings_type`` overrides the type of ``token_embd`` and ``output``;
- ``attn_q`` / ``attn_k`` rows are permuted with :func:`~compress.formats.gguf_names.permute_qk`
  (llama.cpp's ``LlamaModel.permute``), which the GGUF reader undoes exactly.

:func:`export_gguf` is the Python entry point; :func:`quantize_gguf` is ``compress quantize --format gguf``,
which also writes the accuracy report and the provenance beside the file (``OUT.report.json``,
``OUT.report.md``, ``OUT.provenance.json``: a GGUF has no folder to hold them, and run-specific details must
stay out of the weights so that they are byte-identical between runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader, TensorInfo, weight_file_bytes
from compress.formats.gguf_names import LLAMA_LAYER_NAMES, gguf_name, permute_qk, qk_heads
from compress.formats.gguf_writer import TOKENIZER_MODES, GGUFSink, GGUFTensorInfo, LlamaParams, llama_params
from compress.formats.imatrix import ImportanceMatrix, read_imatrix, write_imatrix
from compress.formats.inputs import open_model
from compress.formats.output import OutputFile, check_output, expect_output_bytes, json_text
from compress.formats.sink import Encoded, encode_packed
from compress.ggml_types import FTYPE_IDS, GGML_TYPES, ggml_block_size
from compress.metrics import ErrorMetrics, compare
from compress.pipeline.algorithm import AlgorithmSettings
from compress.pipeline.execute import Executor, execute
from compress.pipeline.quantize import requantized_note
from compress.pipeline.report import KeptRow, QuantizeReport, TensorRow
from compress.pipeline.run import RunOptions, json_safe, write_provenance
from compress.pipeline.tasks import ModelSource, Task, TaskContext, TaskResult
from compress.quant import config_to_dict
from compress.quant.ggml import GGMLConfig, quantize_ggml
from compress.quant.llama_cpp import llama_cpp_type

METHODS = tuple(FTYPE_IDS)  # what export_gguf writes: the llama.cpp file types and f16 / f32
TENSOR_TYPES = (*GGML_TYPES, "f16", "f32")
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp drops them


@dataclass(frozen=True)
class PlannedTensor(GGUFTensorInfo):
    """A tensor of the file (GGUF name, torch-order shape, type) and where it comes from: the reader's
    tensor ``source`` (None: generated), permuted for ``permute_heads`` heads when set."""

    source: str | None = None
    permute_heads: int | None = None


def plan_tensors(infos: list[TensorInfo], p: LlamaParams, method: str, embeddings_type: str | None,
                 where: str, has_imatrix: bool = False) -> tuple[list[PlannedTensor], list[str]]:
    """GGUF name, shape and type of every tensor, in the reader's order; plus notes."""
    notes: list[str] = []
    fallbacks: list[str] = []
    plan: list[PlannedTensor] = []
    for info in infos:
        if info.name.endswith(_SKIPPED_SUFFIXES):
            continue
        if info.name == "lm_head.weight" and p.tied:
            notes.append("lm_head.weight is tied to the embedding (tie_word_embeddings); not written")
            continue
        name = gguf_name(info.name)
        if name is None:
            raise InputError(f"tensor '{info.name}' has no llama.cpp counterpart", where=where,
                             fix="Only Llama-architecture checkpoints (LlamaForCausalLM) can be exported.")
        if not info.dtype.is_floating_point:
            raise InputError(f"tensor '{info.name}' is {info.dtype}, not a float tensor", where=where,
                             fix="Export from a float checkpoint (dequantize it first).")
        shape = tuple(info.shape)
        if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            qtype = "f32"
        elif embeddings_type is not None and name in ("token_embd.weight", "output.weight"):
            qtype = embeddings_type
            if qtype in GGML_TYPES and shape[-1] % ggml_block_size(qtype):
                notes.append(f"{name}: rows of {shape[-1]} are not whole {qtype.upper()} blocks; written as F16")
                qtype = "f16"
        elif method in ("f16", "f32"):
            qtype = method
        else:
            qtype, note = llama_cpp_type(method, name, shape[-1], p.layers, p.tied, has_imatrix=has_imatrix)
            if note:
                fallbacks.append(note)
        plan.append(PlannedTensor(name, shape, qtype, info.name, qk_heads(name, p.heads, p.kv_heads)))
    if fallbacks:
        notes.append(f"{len(fallbacks)} tensors have rows that are not whole blocks of their type and fell back as "
                     "llama-quantize does: " + "; ".join(fallbacks[:3]) + ("; ..." if len(fallbacks) > 3 else ""))
    names = {t.name for t in plan}
    wanted = ["token_embd.weight", "output_norm.weight"] + ([] if p.tied else ["output.weight"])
    for i in range(p.layers):
        wanted += [f"blk.{i}.{leaf}" for leaf in LLAMA_LAYER_NAMES]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise InputError(f"tensor '{missing[0]}' (GGUF name) is missing ({len(missing)} missing in all)",
                         where=where, fix="The checkpoint is incomplete or not a LlamaForCausalLM.")
    return plan, notes


@dataclass
class GGUFPlan:
    """Everything about a GGUF output that is known before any data is read."""

    method: str
    params: LlamaParams
    tensors: list[PlannedTensor]
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_after(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_gguf(reader: CheckpointReader, method: str, embeddings_type: str | None = None,
              has_imatrix: bool = False) -> GGUFPlan:
    """What each tensor of ``reader`` becomes in a ``method`` file (names, types, bytes), reading no data.
    ``has_imatrix``: an importance matrix is used (llama-quantize's recipe then differs for some tensors)."""
    infos = reader.infos()
    where = str(reader.path)
    params = llama_params(reader.config, infos, where)
    tensors, notes = plan_tensors(infos, params, method, embeddings_type, where, has_imatrix)
    if isinstance(reader.config, dict) and reader.config.get("attention_bias"):
        notes.append("attention biases are written (llama.cpp reads them); compress' GGUF reader does not")
    return GGUFPlan(method, params, tensors, notes)


def kept_reason(qtype: str) -> str:
    if qtype == "f32":
        return "F32: llama.cpp keeps norms and 1-D tensors in float32"
    return "F16: rows are not whole 32-element blocks"


def not_finite(source: str, qtype: str, where: str) -> InputError:
    return InputError(f"tensor '{source}' contains NaN or inf, or values too large for {qtype.upper()}", where=where,
                      fix="Fix the checkpoint; llama.cpp cannot use non-finite weights.")


def gguf_row(planned: PlannedTensor, info_shape: tuple[int, ...], dtype: torch.dtype,
             metrics: ErrorMetrics | None) -> TensorRow | KeptRow:
    """The report row of one stored tensor: its error when it was rounded, else why it is stored as is."""
    assert planned.source is not None
    if metrics is not None:
        return TensorRow(planned.source, info_shape, dtype_name(dtype), 8 * planned.nbytes / math.prod(info_shape),
                         metrics, note=f"{planned.qtype.upper()} as {planned.name}")
    return KeptRow(planned.source, info_shape, dtype_name(dtype), kept_reason(planned.qtype))


def tensor_bytes(t: torch.Tensor, qtype: str, measure: bool,
                 importance: torch.Tensor | None = None) -> tuple[Encoded | None, ErrorMetrics | None]:
    """The GGUF bytes of one tensor (torch order, already permuted), or None when it holds NaN/inf (or values
    its type cannot represent); with ``measure``, the error of what is stored (None for exact F32 copies).
    ``importance`` (float32 [columns]): llama.cpp's importance-weighted search (its ``imatrix`` argument)."""
    if qtype in GGML_TYPES:
        q = quantize_ggml(t, GGMLConfig(qtype), importance=importance)
        if not q.scales_finite():  # NaN/inf reach the block scales
            return None, None
        return encode_packed(q.packed(), qtype, tuple(t.shape)), (q.error_against(t) if measure else None)
    out = t.float()  # bf16/f16 -> f32 exactly; f16 output rounds from f32, as llama.cpp's converter does
    if qtype == "f16":
        out = out.half()
    if not bool(torch.isfinite(out).all()):
        return None, None
    # F32 copies of f32/bf16/f16 tensors are exact; only F16 from another dtype rounds
    metrics = compare(t, out) if measure and qtype == "f16" and t.dtype != torch.float16 else None
    return encode_packed(out.contiguous().view(torch.uint8), qtype, tuple(t.shape)), metrics


@dataclass(frozen=True)
class GGUFTensorTask(Task):
    """Read one tensor, permute it for llama.cpp when planned, store it in its planned type."""

    source: str
    planned: PlannedTensor
    dtype: torch.dtype
    where: str
    measure: bool
    # "optimize": llama.cpp's importance-weighted search with ``importance`` (all ones when None), kept only where
    # it lowers the weight error unless the importance came from an importance matrix (then exactly llama.cpp's)
    algorithm: str = "rtn"
    importance: torch.Tensor | None = None

    def read_planned(self, ctx: TaskContext) -> torch.Tensor:
        """The tensor as the file stores it (Q/K rows permuted for llama.cpp), on the task's device."""
        planned = self.planned
        w = ctx.read(self.source, self.name)
        if tuple(w.shape) != planned.shape:
            raise InputError(f"tensor '{self.name}' has shape {list(w.shape)}, its header said {list(planned.shape)}",
                             where=self.where, fix="The checkpoint is corrupt.")
        if planned.permute_heads is not None:
            w = permute_qk(w, planned.permute_heads)
        return w.to(ctx.device)

    def run(self, ctx: TaskContext) -> TaskResult:
        planned = self.planned
        w = self.read_planned(ctx)
        data, metrics = tensor_bytes(w, planned.qtype, self.measure or self.algorithm != "rtn")
        if data is None:
            raise not_finite(self.name, planned.qtype, self.where)
        row = gguf_row(planned, planned.shape, self.dtype, metrics)
        if self.algorithm != "rtn" and planned.qtype in GGML_TYPES and planned.qtype != "q8_0":
            data, row = self.searched(w, data, row)
        return TaskResult([(planned.name, data)], [row])

    def searched(self, w: torch.Tensor, rtn_data: Encoded, rtn_row: Any) -> tuple[Encoded, Any]:
        """The importance-weighted search's bytes and row, with the plain quantizer's error beside it."""
        planned = self.planned
        uniform = self.importance is None
        importance = torch.ones(planned.shape[-1]) if uniform else self.importance
        data, metrics = tensor_bytes(w, planned.qtype, True, importance=importance)
        assert data is not None and metrics is not None and isinstance(rtn_row, TensorRow)
        if uniform and metrics.rel_fro > rtn_row.metrics.rel_fro:  # never worse on the weight error
            return rtn_data, replace(rtn_row, rtn=rtn_row.metrics, algorithm="rtn")
        row = replace(gguf_row(planned, planned.shape, self.dtype, metrics), rtn=rtn_row.metrics,  # type: ignore[type-var]
                      algorithm="optimize" if uniform else "imatrix")
        return data, row


def gguf_tasks(plan: GGUFPlan, reader: CheckpointReader, *, measure: bool, source: str = "model",
               algorithm: str = "rtn", imatrix: ImportanceMatrix | None = None) -> list[Task]:
    """One task per planned tensor; with ``imatrix``, each quantized tensor gets its importance vector (a tensor
    the matrix lacks is quantized without, as llama-quantize does)."""
    infos = {i.name: i for i in reader.infos()}
    tasks: list[Task] = []
    for t in plan.tensors:
        assert t.source is not None
        info = infos[t.source]
        importance = None
        if imatrix is not None and t.qtype in GGML_TYPES and t.name in imatrix.entries:
            importance = imatrix.importance(t.name, t.shape[-1])[0]
        # with a matrix, a tensor it lacks is quantized as llama-quantize does then: without importance
        how = "optimize" if importance is not None else ("rtn" if imatrix is not None else algorithm)
        tasks.append(GGUFTensorTask(t.source, info.nbytes, source, t, info.dtype, str(reader.path), measure, how,
                                    importance))
    return tasks


@dataclass
class GGUFRows:
    """The rows of a GGUF run, by source tensor (a task's rows are TensorRow or KeptRow)."""

    rows: dict[str, TensorRow | KeptRow] = field(default_factory=dict)
    other: list[Any] = field(default_factory=list)

    def add(self, row: Any) -> None:
        if isinstance(row, TensorRow | KeptRow):
            self.rows[row.name] = row
        else:
            self.other.append(row)


def export_summary(plan: GGUFPlan, sink: GGUFSink, rows: GGUFRows, out: Path) -> dict[str, Any]:
    """export_gguf's result: ``{"file", "method", "file_type", "bytes", "tensors": [{"name", "source", "type",
    "shape", "bytes", "metrics"?}...], "by_type": {TYPE: {"tensors", "params", "bytes"}}, "tokenizer", "notes"}``;
    ``shape`` in GGUF order (innermost first), ``bytes`` without padding."""
    by_type: dict[str, dict[str, int]] = {}
    tensors = []
    for t in sink.tensors:
        qname = t.qtype.upper()
        entry = by_type.setdefault(qname, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += math.prod(t.shape)
        entry["bytes"] += t.nbytes
        source = t.source if isinstance(t, PlannedTensor) else None
        item: dict[str, Any] = {"name": t.name, "source": source, "type": qname, "shape": list(reversed(t.shape)),
                                "bytes": t.nbytes}
        row = rows.rows.get(source) if source is not None else None
        if isinstance(row, TensorRow):
            item["metrics"] = row.metrics.as_dict()
        tensors.append(item)
    return {"file": str(out), "method": plan.method, "file_type": FTYPE_IDS[plan.method], "bytes": sink.bytes,
            "tensors": tensors, "by_type": by_type, "tokenizer": sink.tokenizer, "notes": plan.notes + sink.notes}


def check_options(method: str, embeddings_type: str | None, tokenizer: str) -> None:
    if method not in METHODS:
        raise OptionError(f"GGUF method must be one of {', '.join(METHODS)}, got {method!r}")
    if embeddings_type is not None and embeddings_type not in TENSOR_TYPES:
        raise OptionError(f"embeddings type must be one of {', '.join(TENSOR_TYPES)}, got {embeddings_type!r}")
    if not tokenizer:
        raise OptionError("--tokenizer is empty", fix="Give a tokenizer.json, a folder with one, or none.")
    if tokenizer not in TOKENIZER_MODES and not Path(tokenizer).exists():
        raise OptionError(f"--tokenizer {tokenizer}: no such file or folder",
                          fix="Give a tokenizer.json, a folder with one, 'none', or leave it out (the model's own).")


def export_gguf(reader: CheckpointReader, out_file: str | Path, method: str = "q4_0", *,
                embeddings_type: str | None = None, tokenizer: str = "auto", name: str | None = None,
                force: bool = False, measure: bool = False, run: RunOptions | None = None) -> dict[str, Any]:
    """Write ``reader``'s Llama model as a llama.cpp GGUF file, serially; returns :func:`export_summary`.

    ``method``: a llama.cpp file type (``q4_0`` ... ``q6_k``), ``f16`` or ``f32``; ``embeddings_type``: one
    tensor type for ``token_embd`` and ``output``; ``tokenizer``: ``auto`` (carry it; error if it cannot be)
    or ``none``; ``name``: ``general.name``; ``force``: replace an existing file; ``measure``: the error of
    every rounded tensor (``metrics`` in its entry). ``run``: device and executor (default: serial, CPU).
    """
    check_options(method, embeddings_type, tokenizer)
    out = Path(out_file)
    check_output(out, force=force, inputs=[Path(reader.path)], kind="file")
    plan = plan_gguf(reader, method, embeddings_type)
    run = run or RunOptions()
    rows = GGUFRows()
    with GGUFSink(out, force=force, reader=reader, params=plan.params, file_type=method, tensors=plan.tensors,
                  tokenizer=tokenizer, name=name) as sink:
        execute(gguf_tasks(plan, reader, measure=measure), sink, rows.add, sources={}, opened={"model": reader},
                device=run.device, progress=run.on_task)
        sink.commit()
    return export_summary(plan, sink, rows, out)


# --- `compress quantize --format gguf` ---------------------------------------------------------------------


def sidecar_paths(out: Path) -> dict[str, Path]:
    """The files written beside ``OUT.gguf``."""
    stem = out.name.removesuffix(".gguf")
    return {"report_json": out.with_name(f"{stem}.report.json"), "report_md": out.with_name(f"{stem}.report.md"),
            "provenance": out.with_name(f"{stem}.provenance.json")}


def check_gguf_output(out: Path, *, force: bool, inputs: list[Path], extra: tuple[Path, ...] = ()) -> None:
    """Refuse a GGUF output that is not a .gguf path, overlaps an input, or exists (with its sidecars and the
    ``extra`` files written with it)."""
    if out.suffix != ".gguf":
        raise OptionError(f"--format gguf writes one file: {out} must end in .gguf",
                          fix="Pass -o MODEL.gguf (the report goes beside it as MODEL.report.md).")
    for path in extra:
        check_output(path, force=force, inputs=inputs, kind="file")
    check_output(out, force=force, inputs=inputs, kind="file",
                 sidecars=(*sidecar_paths(out).values(), *extra))


def imatrix_provenance(settings: AlgorithmSettings, matrix: ImportanceMatrix | None) -> dict[str, Any] | None:
    if matrix is None:
        return None
    source: dict[str, Any] = ({"file": str(settings.imatrix)} if settings.imatrix is not None else
                              settings.calibration.as_dict() if settings.calibration is not None else {})
    return {**source, "entries": len(matrix.entries), "chunks": matrix.chunks, "chunk_size": matrix.chunk_size,
            "datasets": list(matrix.datasets),
            "saved_to": str(settings.save_imatrix) if settings.save_imatrix is not None else None}


def gguf_report(plan: GGUFPlan, reader: CheckpointReader, rows: GGUFRows, sink: GGUFSink) -> QuantizeReport:
    """The accuracy report of a GGUF run, rows in the file's order."""
    report = QuantizeReport(method=plan.method, parameters=config_to_dict(GGMLConfig(plan.method)), format="gguf",
                            bytes_before=weight_file_bytes(reader), bytes_after=sink.bytes,
                            notes=plan.notes + sink.notes)
    for t in plan.tensors:
        assert t.source is not None
        report.add(rows.rows[t.source])
    by_type: dict[str, int] = {}
    for t in sink.tensors:
        by_type[t.qtype.upper()] = by_type.get(t.qtype.upper(), 0) + 1
    report.notes.append("GGUF tensor types: " + ", ".join(f"{k} {v}" for k, v in by_type.items()))
    return report


def write_gguf_sidecars(staging: OutputFile, report_json: dict[str, Any], report_md: str, run: RunOptions,
                        command: str, source: Path, details: dict[str, Any]) -> None:
    """OUT.report.json, OUT.report.md and OUT.provenance.json, staged beside the file (renamed with it)."""
    side = sidecar_paths(staging.out)
    staging.sidecar(side["report_json"]).write_text(json_text(json_safe(report_json), ascii_only=True),
                                                    encoding="utf-8")
    staging.sidecar(side["report_md"]).write_text(report_md, encoding="utf-8")
    write_provenance(staging.sidecar(side["provenance"]), run, command, source, staging.out, details)


@dataclass(frozen=True)
class GGUFRequest:
    """`compress quantize --format gguf`."""

    model: Path
    out: Path
    method: str
    force: bool = False
    settings: AlgorithmSettings = field(default_factory=AlgorithmSettings)
    tokenizer: str = "auto"  # auto (the model's own), none, or a path (--tokenizer)


def dry_run_gguf(model: Path, method: str, settings: AlgorithmSettings = AlgorithmSettings()  # noqa: B008
                 ) -> tuple[GGUFPlan, list[TensorInfo]]:
    with open_model(model) as reader:
        return plan_gguf(reader, method, has_imatrix=settings.uses_importance_matrix), reader.infos()


def importance_matrix(request: GGUFRequest, reader: CheckpointReader, plan: GGUFPlan,
                      run: RunOptions) -> ImportanceMatrix | None:
    """The importance matrix of the run: read (``--imatrix``) and checked against the model, or computed from the
    calibration text (``--calibration``); None without either."""
    settings = request.settings
    if settings.imatrix is not None:
        matrix = read_imatrix(settings.imatrix)
        check_imatrix(matrix, plan, str(settings.imatrix))
        return matrix
    if settings.calibration is None:
        return None
    from compress.calib.importance import compute_importance

    return compute_importance(request.model, reader, settings.calibration, run.device,
                              {t.source: t.name for t in plan.tensors if t.source is not None})


def check_imatrix(matrix: ImportanceMatrix, plan: GGUFPlan, where: str) -> None:
    """InputError when the matrix does not belong to this model: no entry names one of its quantized tensors, or
    an entry's size is not what the tensor's rows need."""
    quantized = {t.name: t for t in plan.tensors if t.qtype in GGML_TYPES}
    found = [name for name in matrix.entries if name in quantized]
    if not found:
        raise InputError("the importance matrix has no entry for any tensor of this model", where=where,
                         fix="Use the importance matrix made for this model (or compute one with --calibration).")
    for name in found:
        entry, columns = matrix.entries[name], quantized[name].shape[-1]
        if entry.n_per_row != columns:
            raise InputError(f"the importance matrix gives {entry.n_per_row} values for '{name}', whose rows have "
                             f"{columns}: it was made for another model", where=where,
                             fix="Use the importance matrix made for this model (or compute one with --calibration).")


def quantize_gguf(request: GGUFRequest, run: RunOptions) -> QuantizeReport:
    """Quantize ``request.model`` into one llama.cpp file, its report and provenance beside it."""
    check_gguf_output(request.out, force=request.force, inputs=[request.model],
                      extra=(request.settings.save_imatrix,) if request.settings.save_imatrix else ())
    settings = request.settings
    with open_model(request.model) as reader:
        plan = plan_gguf(reader, request.method, has_imatrix=settings.uses_importance_matrix)
        matrix, calibrated, details = None, None, {}
        if settings.algorithm == "gptq":  # the plan's order is the calibration's: set before the sink is made
            calibrated, details = gptq_run(request, reader, plan, run)
        else:
            matrix = importance_matrix(request, reader, plan, run)
            tasks = gguf_tasks(plan, reader, measure=True, algorithm=settings.algorithm, imatrix=matrix)
        infos = {i.name: i for i in reader.infos()}
        rows = GGUFRows()
        with GGUFSink(request.out, force=request.force, reader=reader, params=plan.params, file_type=plan.method,
                      tensors=plan.tensors, tokenizer=request.tokenizer) as sink, \
                Executor(run.executor, sources={"model": ModelSource(str(request.model))}, opened={"model": reader},
                         device=run.device) as executor:
            expect_output_bytes(sum(t.nbytes for t in sink.tensors))
            run.start(f"{request.method} (gguf{', gptq' if calibrated else ''})",
                      sum(infos[t.source].nbytes for t in plan.tensors if t.source is not None), len(plan.tensors))
            if calibrated is not None:
                calibrated.run(executor, sink, rows.add, run)
                calibration = settings.calibration
                assert calibration is not None
                matrix = calibrated.importance_matrix(calibration.samples, calibration.length, calibration.source)
            else:
                executor.run(tasks, sink, rows.add, progress=run.on_task)
            sink.finish()
            report = gguf_report(plan, reader, rows, sink)
            if settings.algorithm != "rtn":
                report.parameters = {**report.parameters, "algorithm": settings.algorithm,
                                     **({"imatrix": True} if matrix is not None else {})}
            report.notes += requantized_note(reader)
            if matrix is not None and settings.save_imatrix is not None:
                write_imatrix(matrix, sink.staging.sidecar(settings.save_imatrix),
                              layout="dat" if settings.save_imatrix.suffix == ".dat" else "gguf")
            write_gguf_sidecars(sink.staging, report.as_dict(), report.to_markdown(), run, "quantize", request.model,
                                {"method": request.method, "parameters": report.parameters, "format": "gguf",
                                 "importance_matrix": imatrix_provenance(settings, matrix), **details,
                                 "execution": executor.stats.as_dict()})
            sink.commit()
    return report


def gptq_run(request: GGUFRequest, reader: CheckpointReader, plan: GGUFPlan,
             run: RunOptions) -> tuple[Any, dict[str, Any]]:
    """The calibrated run of ``--algorithm gptq`` (it reorders ``plan``) and what its provenance records."""
    from compress.calib.importance import calibration_tokens
    from compress.pipeline.gguf_calibrated import GGUFCalibratedRun

    settings = request.settings
    assert settings.calibration is not None and settings.gptq is not None
    tokens, text_sha256 = calibration_tokens(request.model, settings.calibration, [])
    calibrated = GGUFCalibratedRun(reader, plan, tokens, settings.gptq, run)
    return calibrated, {"calibration": {**settings.calibration.as_dict(), "sha256": text_sha256},
                        "gptq": calibrated.provenance()}
