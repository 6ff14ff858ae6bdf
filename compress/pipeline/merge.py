"""`compress merge`: LoRA adapters into a base, written as a float checkpoint, a quantized folder layout or a
GGUF file; every case is a list of tasks over the merged model (:class:`~compress.pipeline.merged.MergedSource`)
run by the one executor.

- float: each tensor read from the merged model (:class:`~compress.pipeline.tasks.CopyTensor`), in the
  base's dtypes;
- a folder layout (``--quantize nf4|int4|...``): :mod:`compress.pipeline.merge_quant` decides per tensor how
  the update enters the quantized weights (``--strategy``);
- GGUF (``--quantize q4_0|...|q6_k``): the merged float weights quantized once, as ``compress quantize`` would
  quantize the float merge; with ``q4_1``, a QA-LoRA update that is constant inside every 32-element block
  is folded into the block minimums instead (:class:`FoldQ4_1`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.calib.importance import calibration_tokens
from compress.errors import InputError, OptionError
from compress.formats import FORMATS
from compress.formats.base import ExportFormat
from compress.formats.checkpoint import CheckpointReader
from compress.formats.gguf_names import permute_qk
from compress.formats.gguf_writer import GGUFSink
from compress.formats.inputs import open_model
from compress.formats.output import check_output, write_json
from compress.formats.peft_adapter import read_adapter
from compress.formats.quantized import DequantizingReader
from compress.formats.sink import encode_packed
from compress.formats.writer import FolderSink, TensorSpec, write_model_files
from compress.merge.combine import make_combine, method_options
from compress.merge.requant import STRATEGIES, is_group_constant
from compress.pipeline.algorithm import AlgorithmSettings
from compress.pipeline.calibrated import CalibratedRun, act_order_config
from compress.pipeline.execute import Executor, execute
from compress.pipeline.gguf import (
    GGUFRows,
    GGUFTensorTask,
    PlannedTensor,
    check_gguf_output,
    gguf_report,
    gguf_row,
    not_finite,
    plan_gguf,
    tensor_bytes,
    write_gguf_sidecars,
)
from compress.pipeline.merge_plan import MergeOptions, MergePlan, plan_merge
from compress.pipeline.merge_quant import (
    PassedThrough,
    RequantReport,
    RequantRow,
    check_float_base,
    finish_requant_notes,
    merge_quantize_tasks,
)
from compress.pipeline.merged import MergedReader, MergedSource, MergeReport, MergeRow
from compress.pipeline.plan import Plan, make_plan
from compress.pipeline.quantize import algorithm_parameters, entry_task, write_quantized_files
from compress.pipeline.report import KeptRow, QuantizeReport, TensorRow
from compress.pipeline.run import RunOptions, json_safe, write_provenance
from compress.pipeline.tasks import CopyTensor, ModelSource, Source, Task, TaskContext, TaskResult
from compress.quant import METHODS, describe_config, make_config
from compress.quant.ggml import BLOCK, GGMLConfig, quantize_ggml


@dataclass(frozen=True)
class MergeRequest:
    """`compress merge`. ``combine`` and its options (``density``, ``rank``, ``seed``) name the combine method;
    ``quantize`` is ``none`` or a method, with ``layout`` (--format), ``strategy``, ``float_base`` and the
    method's parameters."""

    base: Path
    adapters: tuple[Path, ...]
    out: Path | None
    weights: tuple[float, ...] = ()
    combine: str = "sum"
    density: float | None = None
    rank: int | None = None
    seed: int = 0
    qalora_pooling: str = "peft"
    quantize: str = "none"
    layout: str | None = None
    strategy: str = "auto"
    float_base: Path | None = None
    block_size: int = 64
    double_quant: bool = False
    group_size: int | None = None
    symmetric: bool = False
    shard_bytes: int = 5_000_000_000
    force: bool = False
    settings: AlgorithmSettings = field(default_factory=AlgorithmSettings)

    @property
    def inputs(self) -> list[Path]:
        return [self.base, *self.adapters]

    def merge_options(self) -> MergeOptions:
        if self.weights and len(self.weights) != len(self.adapters):
            raise OptionError(f"{len(self.weights)} --weight values for {len(self.adapters)} adapters",
                              fix="Give one --weight per --adapter, in the same order, or none (every weight 1.0).")
        options: dict[str, Any] = {"density": self.density, "rank": self.rank}
        if "seed" in method_options(self.combine):
            options["seed"] = self.seed
        try:
            return MergeOptions(method=make_combine(self.combine, **options), weights=tuple(self.weights),
                                qalora_pooling=self.qalora_pooling)
        except ValueError as e:
            raise OptionError(str(e), fix="See `compress merge --help`.") from e

    def export_format(self) -> ExportFormat | None:
        """The output format with --quantize (None for a float checkpoint); checks the option combinations."""
        if self.quantize == "none":
            if self.layout is not None or self.float_base is not None or self.strategy != "auto":
                raise OptionError("--format, --strategy and --float-base apply only with --quantize",
                                  fix="Add --quantize nf4|int4|... or drop those options.")
            return None
        fmt = FORMATS[self.layout or METHODS[self.quantize].default_format]
        if self.quantize not in fmt.methods:
            pairs = ", ".join(f"{m}+{f.name}" for f in FORMATS.values() for m in f.methods)
            raise OptionError(f"--format {fmt.name} cannot hold --quantize {self.quantize}",
                              fix=f"Pairs that work: {pairs}.")
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise OptionError(f"unknown strategy {self.strategy!r}", fix=f"Use auto or one of {', '.join(STRATEGIES)}.")
        return fmt

    def provenance(self, plan: MergePlan) -> dict[str, Any]:
        return {"adapters": [str(p.resolve()) for p in self.adapters], "weights": list(plan.weights),
                "combine": plan.options.method.to_dict(), "qalora_pooling": self.qalora_pooling,
                "quantize": self.quantize}


@dataclass
class MergeResult:
    """What a merge wrote: ``report`` is what the command shows (the merge report for a float output, the
    quantization report otherwise), ``size`` the bytes written, ``report_json`` the report file."""

    out: Path
    kind: str  # float | folder | gguf
    report: Any
    size: int
    report_json: Path
    merge: MergeReport
    requant: RequantReport | None = None
    notes: list[str] = field(default_factory=list)


def check_merge_output(request: MergeRequest, fmt: ExportFormat | None) -> None:
    assert request.out is not None
    if fmt is not None and fmt.container == "file":
        check_gguf_output(request.out, force=request.force, inputs=request.inputs)
    else:
        check_output(request.out, force=request.force, inputs=request.inputs)


def open_merge(request: MergeRequest, options: MergeOptions) -> tuple[CheckpointReader, MergePlan]:
    """The base, opened (the caller closes it), and the merge plan (adapters read and matched)."""
    adapters = [read_adapter(p) for p in request.adapters]
    base = open_model(request.base)
    try:
        plan = plan_merge(base, adapters, options)
    except BaseException:
        base.close()
        raise
    return base, plan


def dry_run_merge(request: MergeRequest) -> MergePlan:
    options = request.merge_options()
    request.export_format()
    base, plan = open_merge(request, options)
    base.close()
    return plan


def merge(request: MergeRequest, run: RunOptions) -> MergeResult:
    """Merge the adapters into the base and write ``request.out`` in the requested form."""
    options = request.merge_options()
    fmt = request.export_format()
    check_merge_output(request, fmt)
    base, plan = open_merge(request, options)
    with base:
        if isinstance(base, DequantizingReader):
            plan.notes.append(f"the base was quantized ({base.format.name}); the adapters were merged into its "
                              "dequantized weights")
        merged = MergedReader(base, plan, device=run.device)
        source = MergedSource(str(request.base), tuple(str(p) for p in request.adapters), options)
        if fmt is None:
            return _merge_float(request, merged, source, run)
        if fmt.container == "file":
            if request.settings.algorithm != "rtn":
                raise OptionError("--algorithm with --quantize into GGUF is not offered by merge",
                                  fix="Merge into a float folder (no --quantize), then `compress quantize` it to GGUF.")
            return _merge_gguf(request, merged, source, run)
        return _merge_folder(request, fmt, merged, source, run)


def _merge_float(request: MergeRequest, merged: MergedReader, source: Source, run: RunOptions) -> MergeResult:
    out = request.out
    assert out is not None
    infos = merged.infos()
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in infos]
    tasks = [CopyTensor(i.name, i.nbytes, "merged", i.shape, i.dtype) for i in infos]
    report = MergeReport.start(merged.plan)
    run.start("merge", sum(i.nbytes for i in infos), len(tasks))
    with FolderSink(out, force=request.force, specs=specs, shard_bytes=request.shard_bytes) as sink:
        stats = execute(tasks, sink, report.add, sources={"merged": source}, opened={"merged": merged},
                        device=run.device, options=run.executor, progress=run.on_task)
        write_model_files(sink.folder, dict(merged.config) if merged.config else None, merged.extra_files())
        report.bytes_written = sink.bytes
        _write_reports(sink.folder, report.as_dict(), report.to_markdown())
        write_provenance(sink.folder / "compress_provenance.json", run, "merge", request.base, out,
                         {**request.provenance(merged.plan), "shard_size": request.shard_bytes,
                          "execution": stats.as_dict()})
        sink.commit()
    return MergeResult(out, "float", report, report.bytes_written, out / "report.json", report)


def _write_reports(folder: Path, as_json: dict[str, Any], markdown: str) -> None:
    write_json(folder / "report.json", json_safe(as_json))
    (folder / "report.md").write_text(markdown, encoding="utf-8")


def _base_int4_group(base: CheckpointReader) -> int | None:
    """The INT4 group size of a quantized base (so merged weights keep it and folds stay possible)."""
    if not isinstance(base, DequantizingReader):
        return None
    for info in base.infos():
        if base.is_quantized(info.name):
            size = getattr(base.quantized(info.name), "group_size", None)  # NF4 has blocks, not groups
            return size if isinstance(size, int) else None
    return None


class _MergeQuantRows:
    """Routes a merge --quantize run's rows to its three reports."""

    def __init__(self, merge: MergeReport, requant: RequantReport, quant: QuantizeReport) -> None:
        self.merge, self.requant, self.quant = merge, requant, quant

    def add(self, row: Any) -> None:
        if isinstance(row, MergeRow):
            self.merge.add(row)
        elif isinstance(row, TensorRow | KeptRow):
            self.quant.add(row)
        elif isinstance(row, RequantRow | PassedThrough):
            self.requant.add(row)
        else:
            raise TypeError(f"not a merge report row: {row!r}")


def _merge_folder(request: MergeRequest, fmt: ExportFormat, merged: MergedReader, source: Source,
                  run: RunOptions) -> MergeResult:
    out = request.out
    assert out is not None
    base = merged.base
    try:
        config = make_config(request.quantize, block_size=request.block_size, double_quant=request.double_quant,
                             group_size=request.group_size or _base_int4_group(base) or 128,
                             symmetric=request.symmetric)
    except ValueError as e:
        raise OptionError(str(e), fix="Change that value (`compress merge --help` describes every option).") from e
    settings = request.settings
    if settings.gptq is not None:
        config = act_order_config(config, fmt.name, settings.gptq)
    if settings.algorithm != "rtn" and (isinstance(base, DequantizingReader) or request.float_base is not None):
        raise OptionError(f"--algorithm {settings.algorithm} applies when BASE is a float checkpoint (the merged "
                          "weights are then quantized once)",
                          fix="Pass the float base as BASE, or drop --algorithm for a quantized base.")
    plan = make_plan(merged.infos(), request.quantize, config, fmt, algorithm=settings.algorithm)  # type: ignore[arg-type]
    if not plan.quantized:
        raise OptionError("no tensor is selected for quantization", fix="Check the base: it has no Linear weights.")
    calibrated = None
    if settings.calibration is not None and settings.gptq is not None:  # orders plan.entries block by block
        tokens, text_sha256 = calibration_tokens(request.base, settings.calibration, [])
        calibrated = CalibratedRun(merged, plan, tokens, settings.gptq, run, source="merged")
    sources: dict[str, Source] = {"merged": source}
    opened: dict[str, CheckpointReader] = {"merged": merged}
    if request.float_base is not None:
        float_base = open_model(request.float_base)
        opened["float_base"] = float_base
        sources["float_base"] = ModelSource(str(request.float_base))
        if isinstance(float_base, DequantizingReader):
            float_base.close()
            raise InputError("--float-base is itself quantized", where=str(request.float_base),
                             fix="Pass the float checkpoint the base was quantized from.")
    try:
        if "float_base" in opened:
            check_float_base(opened["float_base"], plan)  # before anything is read or written
        merge_report = MergeReport.start(merged.plan)
        requant = RequantReport(strategy=request.strategy)
        report = QuantizeReport(method=plan.method, parameters=algorithm_parameters(plan), format=fmt.name,
                                bytes_before=plan.input_bytes, bytes_after=plan.output_bytes)
        rows = _MergeQuantRows(merge_report, requant, report)
        run.start(f"merge + {describe_config(plan.config)} ({fmt.name})", plan.input_bytes, len(plan.entries))
        with FolderSink(out, force=request.force, specs=plan.output_specs(), shard_bytes=request.shard_bytes) as sink, \
                Executor(run.executor, sources=sources, opened=opened, device=run.device) as executor:
            if calibrated is not None:
                calibrated.run(executor, sink, rows.add)
            else:
                executor.run(merge_tasks(plan, request, "float_base" in opened), sink, rows.add, progress=run.on_task)
            stats = executor.stats
            finish_requant_notes(requant, fmt.name, config)
            write_quantized_files(sink.folder, plan, merged, report)
            merge_report.notes += requant.notes
            _write_reports(sink.folder, {"merge": merge_report.as_dict(), "requantization": requant.as_dict(),
                                             "quantization": report.as_dict()},
                           merge_report.to_markdown() + "\n" + requant.to_markdown() + "\n" + report.to_markdown())
            write_provenance(sink.folder / "compress_provenance.json", run, "merge", request.base, out,
                             {**request.provenance(merged.plan), "format": fmt.name,
                              "parameters": algorithm_parameters(plan), "strategy": request.strategy,
                              **(calibrated.provenance(settings.calibration, text_sha256)  # type: ignore[arg-type]
                                 if calibrated is not None else {}),
                              "float_base": str(request.float_base.resolve()) if request.float_base else None,
                              "shard_size": request.shard_bytes, "execution": stats.as_dict()})
            sink.commit()
    finally:
        if "float_base" in opened:
            opened["float_base"].close()
    return MergeResult(out, "folder", report, report.bytes_after, out / "report.json", merge_report, requant,
                       requant.notes)


def merge_tasks(plan: Plan, request: MergeRequest, float_base: bool) -> list[Task]:
    """merge --quantize's tasks: the re-rounding strategies, or with an algorithm other than rtn (a float base) the
    quantize tasks on the merged weights."""
    if plan.algorithm == "rtn":
        return merge_quantize_tasks(plan, strategy=request.strategy, float_base=float_base)
    return [entry_task(entry, plan, "merged") for entry in plan.entries]


@dataclass(frozen=True)
class Folded:
    """Report row: a QA-LoRA update folded into Q4_1 block minimums."""

    tensor: str


@dataclass(frozen=True)
class FoldQ4_1(Task):
    """A merged Q4_1 tensor. When the update is constant inside every 32-element block (a QA-LoRA adapter with
    groups of 32 or multiples), it is stored as Q4_1(base) with the update added to each block's minimum --
    llama.cpp's offset, a float16 -- instead of re-rounding base + update; the error is measured against
    Q4_1(base) + update (what remains is the float16 rounding of the minimums). Otherwise the merged weights
    are quantized as usual."""

    planned: PlannedTensor
    dtype: torch.dtype
    where: str

    def run(self, ctx: TaskContext) -> TaskResult:
        planned = self.planned
        merged = ctx.reader("merged")
        assert isinstance(merged, MergedReader)
        mt = merged.merge_tensor(self.name)
        W, dW = mt.W.float(), mt.delta.float()
        rows: list[Any] = [mt.row]
        if dW.dim() != 2 or not is_group_constant(dW, BLOCK):
            w = mt.merged.to("cpu", self.dtype)
            if planned.permute_heads is not None:
                w = permute_qk(w, planned.permute_heads)
            data, metrics = tensor_bytes(w.to(ctx.device), planned.qtype, True)
        else:
            if planned.permute_heads is not None:
                W, dW = permute_qk(W, planned.permute_heads), permute_qk(dW, planned.permute_heads)
            q = quantize_ggml(W, GGMLConfig("q4_1"))
            ideal = q.dequantize(torch.float32) + dW
            assert q.m is not None
            q.m = (q.m.float() + dW.reshape(-1, BLOCK)[:, 0]).to(torch.float16)
            rows.append(Folded(self.name))
            data = encode_packed(q.packed(), "q4_1", planned.shape) if q.scales_finite() else None
            metrics = q.error_against(ideal) if data is not None else None
        if data is None:
            raise not_finite(self.name, planned.qtype, self.where)
        rows.append(gguf_row(planned, planned.shape, self.dtype, metrics))
        return TaskResult([(planned.name, data)], rows)


def _merge_gguf(request: MergeRequest, merged: MergedReader, source: Source, run: RunOptions) -> MergeResult:
    out = request.out
    assert out is not None
    if request.float_base is not None or request.strategy != "auto":
        raise OptionError("--strategy and --float-base do not apply to --format gguf (the merged float weights are "
                          "quantized once)", fix="Drop them, or use a folder format such as native.")
    plan = plan_gguf(merged, request.quantize)
    infos = {i.name: i for i in merged.infos()}
    tasks: list[Task] = []
    for t in plan.tensors:
        assert t.source is not None
        info, where = infos[t.source], str(merged.path)
        if t.qtype == "q4_1" and merged.is_merged(t.source):
            tasks.append(FoldQ4_1(t.source, info.nbytes, t, info.dtype, where))
        else:
            tasks.append(GGUFTensorTask(t.source, info.nbytes, "merged", t, info.dtype, where, True))
    merge_report = MergeReport.start(merged.plan)
    rows = GGUFRows()
    folded: list[str] = []

    def collect(row: Any) -> None:
        if isinstance(row, MergeRow):
            merge_report.add(row)
        elif isinstance(row, Folded):
            folded.append(row.tensor)
        else:
            rows.add(row)

    with GGUFSink(out, force=request.force, reader=merged, params=plan.params, file_type=plan.method,
                  tensors=plan.tensors) as sink:
        run.start(f"merge + {request.quantize} (gguf)", sum(i.nbytes for i in infos.values()), len(tasks))
        stats = execute(tasks, sink, collect, sources={"merged": source}, opened={"merged": merged},
                        device=run.device, options=run.executor, progress=run.on_task)
        sink.finish()
        report = gguf_report(plan, merged, rows, sink)
        if folded:
            merge_report.notes.append(f"{len(folded)} QA-LoRA updates were folded into the Q4_1 block minimums "
                                      "(codes and scales of Q4_1(base) unchanged; the minimums are float16, so "
                                      "each rounds to 11 significant bits); errors are against Q4_1(base) + update")
        write_gguf_sidecars(sink.staging, {"merge": merge_report.as_dict(), "quantization": report.as_dict()},
                            merge_report.to_markdown() + "\n" + report.to_markdown(), run, "merge", request.base,
                            {**request.provenance(merged.plan), "format": "gguf", "parameters": report.parameters,
                             "execution": stats.as_dict()})
        sink.commit()
    side = out.with_name(out.name.removesuffix(".gguf") + ".report.json")
    return MergeResult(out, "gguf", report, report.bytes_after, side, merge_report)
