"""`compress quantize` into a checkpoint folder layout (bnb, gptq, compressed-tensors, native).

The plan (:func:`~compress.pipeline.plan.make_plan`) decides each tensor's fate; here each becomes a task
(:class:`QuantizeWeight`, or a copy for kept tensors) and the executor streams them into a
:class:`~compress.formats.writer.FolderSink`, which also receives config.json (with the layout's
``quantization_config``), the input's non-weight files, the report and the provenance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats import FORMATS
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader, folder_weight_bytes, weight_file_bytes
from compress.formats.inputs import open_model
from compress.formats.output import check_output, expect_output_bytes, notice, write_json
from compress.formats.quantized import DequantizingReader, model_dtype
from compress.formats.sink import encode
from compress.formats.writer import FolderSink, write_model_files
from compress.metrics import ErrorMetrics
from compress.pipeline.execute import execute
from compress.pipeline.plan import Plan, TensorPlan, make_plan
from compress.pipeline.report import KeptRow, QuantizeReport, TensorRow
from compress.pipeline.run import RunOptions, json_safe, write_provenance
from compress.pipeline.tasks import CopyTensor, ModelSource, Task, TaskContext, TaskResult
from compress.quant import METHODS, config_to_dict, describe_config
from compress.quant.base import QuantizedTensor
from compress.quant.int4 import GROUP_SIZES, Int4Config
from compress.quant.nf4 import NF4Config


def non_finite(W: torch.Tensor, name: str, where: str) -> InputError:
    """The error for a weight that holds NaN or inf (counted here: the slow path)."""
    bad = int((~torch.isfinite(W)).sum())
    return InputError(f"tensor '{name}' has {bad} non-finite values (NaN or inf)", where=where,
                      fix="The checkpoint is damaged; fix it, or --exclude this tensor to keep it as is.")


@dataclass(frozen=True)
class QuantizeWeight(Task):
    """Quantize one weight with ``method``/``config`` and pack it in ``layout``; row: its error."""

    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str
    method: str
    config: Any
    layout: str
    outputs: tuple[str, ...]
    algorithm: str = "rtn"

    def run(self, ctx: TaskContext) -> TaskResult:
        W = ctx.read(self.source, self.name, shape=self.shape, dtype=self.dtype).to(ctx.device)
        qt, metrics, rtn, used = quantize_weight(W, self.method, self.config, self.algorithm,
                                                 float_offset=FORMATS[self.layout].float_offsets)  # type: ignore[attr-defined]
        if not metrics.reference_finite:  # the error sums double as the finiteness check of W
            raise non_finite(W, self.name, self.where)
        packed = FORMATS[self.layout].pack(self.name, qt.to("cpu"))  # type: ignore[attr-defined]
        row = TensorRow(self.name, self.shape, dtype_name(self.dtype), qt.bits_per_weight, metrics, rtn=rtn,
                        algorithm=used)
        return TaskResult([(n, encode(packed[n])) for n in self.outputs], [row])


Quantized = tuple[QuantizedTensor, ErrorMetrics, ErrorMetrics | None, str]


def quantize_weight(W: torch.Tensor, method: str, config: Any, algorithm: str, *,
                    importance: torch.Tensor | None = None, float_offset: bool = False) -> Quantized:
    """W quantized with ``algorithm``: (the tensor to write, its error, RTN's error or None, the algorithm written).

    With ``optimize`` RTN runs too and the better of the two on the weight error is written (the optimiser is
    never worse per group, but double-quantized NF4 statistics can tip a tensor either way)."""
    entry = METHODS[method]
    qt = entry.quantize(W, config)  # garbage in, garbage out: the caller checks metrics.reference_finite
    metrics = qt.error_against(W)
    if algorithm == "rtn" or not metrics.reference_finite:
        return qt, metrics, None, "rtn"
    assert entry.optimize is not None
    best = entry.optimize(W, config, importance=importance, float_offset=float_offset)
    best_metrics = best.error_against(W)
    if best_metrics.rel_fro <= metrics.rel_fro:
        return best, best_metrics, metrics, algorithm
    return qt, metrics, metrics, "rtn"


def entry_task(entry: TensorPlan, plan: Plan, source: str = "model") -> Task:
    """The task for one planned tensor: quantize it, or copy it with the reason it was kept."""
    info = entry.info
    if entry.quantize:
        return QuantizeWeight(info.name, info.nbytes, source, info.shape, info.dtype, str(info.file), plan.method,
                              plan.config, plan.format.name, tuple(s.name for s in entry.outputs), plan.algorithm)
    return CopyTensor(info.name, info.nbytes, source, info.shape, info.dtype,
                      row=KeptRow(info.name, info.shape, dtype_name(info.dtype), entry.reason))


def algorithm_parameters(plan: Plan) -> dict[str, Any]:
    """The method's parameters, with the algorithm when it is not plain rtn (rtn reports stay as they were)."""
    params = config_to_dict(plan.config)
    return params if plan.algorithm == "rtn" else {**params, "algorithm": plan.algorithm}


def plan_notes(plan: Plan) -> list[str]:
    """Facts about the layout a user should know before shipping it."""
    notes: list[str] = []
    cfg = plan.config
    if isinstance(cfg, Int4Config):
        partial = [e for e in plan.quantized if e.info.shape[1] % cfg.group_size]
        if partial:
            ins = sorted({e.info.shape[1] for e in partial})
            notes.append(
                f"{len(partial)} layers have an input size ({', '.join(map(str, ins))}) that is not a multiple of "
                f"the group size {cfg.group_size}: their last group is shorter (n_groups = ceil(in / "
                f"{cfg.group_size}), expressed through g_idx). Kernels that require in % group_size == 0 "
                "(exllama, marlin) fall back to slower paths or refuse them; --group-size 32 or 64 avoids it.")
    if isinstance(cfg, NF4Config):
        odd = [e for e in plan.quantized if e.info.shape[1] % cfg.block_size]
        if odd:
            notes.append(
                f"{len(odd)} layers have an input size that is not a multiple of the block size {cfg.block_size}, "
                "so blocks span rows. The layout is valid (bitsandbytes' own quantize_4bit produces it), but "
                "bitsandbytes 0.50's CPU dequantize kernel reconstructs such layers wrongly; CUDA is unaffected. "
                "For CPU inference with bitsandbytes pick a block size that divides every input size.")
    kept_linear = [e for e in plan.kept if e.unsupported]
    if kept_linear:
        notes.append(f"{len(kept_linear)} Linear weights were kept in float because the format cannot hold them "
                     f"(first: {kept_linear[0].info.name}: {kept_linear[0].reason}).")
    return notes + plan.warnings


def requantized_note(reader: CheckpointReader, what: str = "input") -> list[str]:
    """A note when the input was itself quantized (errors are then against its dequantized weights)."""
    if not isinstance(reader, DequantizingReader):
        return []
    return [f"the {what} was already quantized ({reader.format.name}); it was dequantized and quantized again, so "
            "errors are measured against the dequantized input"]


def quantized_config(reader: CheckpointReader, plan: Plan) -> dict[str, Any] | None:
    """config.json of the output: the input's, with the layout's ``quantization_config`` (None without one)."""
    if not reader.config:
        return None
    config = dict(reader.config)
    config.pop("quantization_config", None)
    fallback = plan.quantized[0].info.dtype if plan.quantized else torch.float32
    config["quantization_config"] = plan.format.quantization_config(  # type: ignore[attr-defined]
        plan.config, model_dtype(config, fallback), plan.kept_linear_modules(), [e.info.name for e in plan.quantized])
    return config


def write_quantized_files(folder: Path, plan: Plan, reader: CheckpointReader, report: QuantizeReport) -> None:
    """config.json with quantization_config, the source's non-weight files (notes into ``report``)."""
    config = quantized_config(reader, plan)
    if config is None:
        report.notes.append("the input has no config.json, so the output has none either: loaders that need "
                            "one (transformers) cannot open it until you add it")
    write_model_files(folder, config, reader.extra_files())
    if not reader.extra_files() and isinstance(reader.config, dict) and reader.path.suffix == ".gguf":
        report.notes.append("no tokenizer files were written (install transformers to convert the GGUF tokenizer)")


def write_report(folder: Path, report: Any) -> None:
    """report.json and report.md of a folder output."""
    write_json(folder / "report.json", json_safe(report.as_dict()))
    (folder / "report.md").write_text(report.to_markdown(), encoding="utf-8")


@dataclass(frozen=True)
class QuantizeRequest:
    """`compress quantize` into a folder layout."""

    model: Path
    out: Path | None
    method: str
    config: Any
    layout: str
    include: str | None = None
    exclude: str | None = None
    shard_bytes: int = 5_000_000_000
    force: bool = False
    algorithm: str = "rtn"


def plan_quantize(reader: CheckpointReader, request: QuantizeRequest) -> Plan:
    plan = make_plan(reader.infos(), request.method, request.config, FORMATS[request.layout],  # type: ignore[arg-type]
                     include=request.include, exclude=request.exclude, algorithm=request.algorithm)
    inner = getattr(reader, "inner", reader)  # a quantized checkpoint's reader wraps the file reader
    plan.warnings += list(getattr(inner, "warnings", []))
    return plan


# An explicit --group-size may leave at most this share of the quantizable parameters in float without --allow-float.
FLOAT_SHARE_ALLOWED = 0.01


def settle_group_size(request: QuantizeRequest, *, explicit: bool, allow_float: bool) -> tuple[QuantizeRequest,
                                                                                                 str | None]:
    """INT4 into a layout that needs the group size to divide every input size (compressed-tensors): with the
    default group size, the largest one that lets the layout hold every selected layer, and a line saying so; with
    an explicit one that would leave more than 1% of the quantizable parameters in float, an error naming the group
    sizes that work (unless ``allow_float``). Returns the request to run and the line to show (or None)."""
    config = request.config
    if not isinstance(config, Int4Config):
        return request, None
    with open_model(request.model) as reader:
        if not any(e.unsupported for e in plan_quantize(reader, request).entries):
            return request, None  # the layout holds every selected layer: nothing to settle
        plans = {g: plan_quantize(reader, replace(request, config=replace(config, group_size=g)))
                 for g in GROUP_SIZES}
    wanted = {e.info.name: math.prod(e.info.shape) for p in plans.values() for e in p.quantized}
    if not wanted:
        return request, None
    left = {g: {e.info.name for e in p.kept if e.info.name in wanted} for g, p in plans.items()}
    total = sum(wanted.values())

    def share(g: int) -> float:
        return sum(wanted[n] for n in left[g]) / total

    current = config.group_size
    if share(current) == 0:
        return request, None
    best = min(share(g) for g in GROUP_SIZES)
    working = [g for g in GROUP_SIZES if share(g) == best]
    example = next(e for e in plans[current].kept if e.info.name in left[current])
    why = f"{example.reason}" if example.reason else "the layout cannot hold them"
    count = len(left[current])
    if explicit:
        if allow_float or share(current) <= FLOAT_SHARE_ALLOWED:
            return request, None
        raise OptionError(f"--group-size {current} would leave {count} of {len(wanted)} quantizable weights "
                          f"({share(current):.0%} of their parameters) in float ({why})",
                          fix=f"Use --group-size {' or '.join(map(str, working))}, or pass --allow-float if that is "
                              "meant.")
    chosen = max(working)
    line = (f"--group-size {chosen} chosen: the default {current} would leave {count} of {len(wanted)} weights in "
            f"float ({why})")
    return replace(request, config=replace(config, group_size=chosen)), line


def dry_run_quantize(request: QuantizeRequest) -> Plan:
    with open_model(request.model) as reader:
        plan = plan_quantize(reader, request)
    show_warnings(plan)
    return plan


def show_warnings(plan: Plan) -> None:
    for line in plan.warnings:
        notice(line, kind="warning")


def quantize_folder(request: QuantizeRequest, run: RunOptions) -> QuantizeReport:
    """Quantize ``request.model`` into the folder ``request.out``; returns the report (also written there)."""
    out = request.out
    assert out is not None
    check_output(out, force=request.force, inputs=[request.model])
    with open_model(request.model) as reader:
        plan = plan_quantize(reader, request)
        show_warnings(plan)
        if not plan.quantized:
            raise OptionError("no tensor is selected for quantization",
                              fix="Check --include/--exclude, or run with --dry-run to see why each tensor is kept.")
        report = QuantizeReport(method=plan.method, parameters=algorithm_parameters(plan), format=plan.format.name,
                                bytes_before=weight_file_bytes(reader), bytes_after=plan.output_bytes,
                                notes=plan_notes(plan))
        tasks = [entry_task(e, plan) for e in plan.entries]
        expect_output_bytes(plan.output_bytes)
        run.start(f"{plan.method} ({describe_config(plan.config)})", plan.input_bytes, len(tasks))
        with FolderSink(out, force=request.force, specs=plan.output_specs(), shard_bytes=request.shard_bytes) as sink:
            stats = execute(tasks, sink, report.add, sources={"model": ModelSource(str(request.model))},
                    opened={"model": reader}, device=run.device, options=run.executor, progress=run.on_task)
            report.notes += requantized_note(reader)
            sink.close_weights()
            report.bytes_after = folder_weight_bytes(sink.folder)
            write_quantized_files(sink.folder, plan, reader, report)
            write_report(sink.folder, report)
            write_provenance(sink.folder / "compress_provenance.json", run, "quantize", request.model, out,
                             {"method": request.method, "parameters": algorithm_parameters(plan),
                              "format": request.layout, "include": request.include, "exclude": request.exclude,
                              "shard_size": request.shard_bytes, "execution": stats.as_dict()})
            sink.commit()
    return report
