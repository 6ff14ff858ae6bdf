"""`compress quantize --algorithm gptq`: quantization from calibration activations, on the one executor.

The plan is quantize's own (:func:`~compress.pipeline.quantize.plan_quantize`), with its entries ordered block by
block (tensors outside the blocks first, then block 0, 1, ...: the order the calibration produces them; the files
are laid out in that order). The calibration runner (:class:`~compress.calib.runner.CalibrationRunner`, in this
process, on ``--device``) runs the model block by block on the calibration samples. Per block, one stage of the
executor (:class:`~compress.pipeline.execute.Executor`, kept open across stages: serial, worker processes or Ray
alike) runs the block's tasks: :class:`GPTQWeight` for each quantized weight, carrying the H = X^T X of its
inputs, and copies for the rest; the results stream into the same open sink, and the quantized weights come
back to the runner, which runs the block again with them to make the next block's inputs.

Every weight is written with the candidate whose output error on the calibration inputs is lowest: GPTQ on the
optimised grid (nearly always), else the optimised grid rounded to nearest, else RTN; the report gives the
weight and output errors of RTN beside those of what was written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from compress.calib.importance import calibration_tokens
from compress.calib.runner import CalibrationRunner
from compress.calib.text import CalibrationOptions
from compress.formats import FORMATS
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader, folder_weight_bytes, weight_file_bytes
from compress.formats.inputs import open_model
from compress.formats.output import check_output
from compress.formats.sink import encode
from compress.formats.writer import FolderSink
from compress.pipeline.execute import Executor, available_cores
from compress.pipeline.plan import Plan, TensorPlan
from compress.pipeline.quantize import (
    QuantizeRequest,
    algorithm_parameters,
    entry_task,
    non_finite,
    plan_notes,
    plan_quantize,
    requantized_note,
    show_warnings,
    write_quantized_files,
    write_report,
)
from compress.pipeline.report import QuantizeReport, TensorRow
from compress.pipeline.run import RunOptions, write_provenance
from compress.pipeline.tasks import ModelSource, Task, TaskContext, TaskResult
from compress.quant import METHODS, describe_config
from compress.quant.gptq import GPTQConfig, gptq_act_order_groups, gptq_quantize, output_errors
from compress.quant.int4 import Int4Config


@dataclass(frozen=True)
class GPTQWeight(Task):
    """GPTQ of one weight given the H [in, in] of its calibration inputs; returns its encoded tensors, its report
    row, and the weight as the file reconstructs it (float32, for the next block's inputs)."""

    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str
    method: str
    config: Any
    layout: str
    outputs: tuple[str, ...]
    H: torch.Tensor
    gptq: GPTQConfig

    def run(self, ctx: TaskContext) -> TaskResult:
        W = ctx.read(self.source, self.name, shape=self.shape, dtype=self.dtype).to(ctx.device)
        H = self.H.to(ctx.device)
        entry = METHODS[self.method]
        rtn = entry.quantize(W, self.config)
        rtn_metrics = rtn.error_against(W)
        if not rtn_metrics.reference_finite:
            raise non_finite(W, self.name, self.where)
        assert entry.optimize is not None
        float_offset = FORMATS[self.layout].float_offsets  # type: ignore[attr-defined]
        grid = entry.optimize(W, self.config, float_offset=float_offset)
        if getattr(self.config, "desc_act", False):  # act-order groups, named by g_idx (gptq layout)
            gptq = gptq_act_order_groups(W, H, lambda Wp: entry.optimize(Wp, self.config), self.gptq)  # type: ignore[misc]
        else:
            gptq = gptq_quantize(W, H, grid, self.gptq)
        candidates = [("gptq", gptq), ("optimize", grid), ("rtn", rtn)]
        errors = output_errors(W, [qt.dequantize(torch.float32) for _, qt in candidates], H)
        best = min(range(len(candidates)), key=lambda i: (errors[i], i))
        used, qt = candidates[best]
        packed = FORMATS[self.layout].pack(self.name, qt.to("cpu"))  # type: ignore[attr-defined]
        row = TensorRow(self.name, self.shape, dtype_name(self.dtype), qt.bits_per_weight, qt.error_against(W),
                        rtn=rtn_metrics, algorithm=used, output_error=errors[best], rtn_output_error=errors[-1])
        return TaskResult([(n, encode(packed[n])) for n in self.outputs], [row],
                          values={self.name: qt.dequantize(torch.float32).cpu()})


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` inside (a reduction's result can depend on how it is split)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def block_of(name: str, runner: CalibrationRunner) -> int:
    """The block index of tensor ``name`` (-1 outside the blocks)."""
    head = f"{runner.prefix}{runner.arch.layers}."
    if not name.startswith(head):
        return -1
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else -1


def staged_entries(plan: Plan, runner: CalibrationRunner) -> list[list[TensorPlan]]:
    """Plan entries per stage: stage 0 the tensors outside the blocks, stage k + 1 those of block k (plan order
    inside each)."""
    stages: list[list[TensorPlan]] = [[] for _ in range(runner.n_blocks + 1)]
    for entry in plan.entries:
        stages[block_of(entry.info.name, runner) + 1].append(entry)
    return stages


def stage_tasks(entries: list[TensorPlan], plan: Plan, block: Any, gptq: GPTQConfig, source: str) -> list[Task]:
    """The tasks of one stage: GPTQ for the block's quantized weights, the usual tasks for the rest."""
    stats = block.statistics() if block is not None else {}
    tasks: list[Task] = []
    for entry in entries:
        info = entry.info
        if entry.quantize and info.name in stats:
            tasks.append(GPTQWeight(info.name, info.nbytes, source, info.shape, info.dtype, str(info.file),
                                    plan.method, plan.config, plan.format.name, tuple(s.name for s in entry.outputs),
                                    stats[info.name].H, gptq))
        else:  # outside the blocks (or not a Linear the runner saw): calibration-free optimisation
            task = entry_task(entry, plan, source)
            tasks.append(replace(task, algorithm="optimize") if entry.quantize else task)  # type: ignore[type-var]
    return tasks


class CalibratedRun:
    """GPTQ over ``reader`` (input key ``source`` of the executor) on ``tokens`` [samples, length]: construct it
    (it orders ``plan.entries`` block by block, so build the sink from the plan afterwards), then :meth:`run` the
    stages into the open sink."""

    def __init__(self, reader: CheckpointReader, plan: Plan, tokens: torch.Tensor, gptq: GPTQConfig,
                 run: RunOptions, source: str = "model") -> None:
        self.plan, self.gptq, self.run_options, self.source = plan, gptq, run, source
        # The runner's forward passes run in this process while the workers wait for its statistics: they get every
        # core, and the same thread count whichever executor runs the tasks, so H has the same bits in each.
        self.threads = available_cores()
        with torch_threads(self.threads):
            self.runner = CalibrationRunner(reader, tokens, run.device)
        self.stages = staged_entries(plan, self.runner)
        plan.entries = [e for stage in self.stages for e in stage]

    def run(self, executor: Executor, sink: Any, collect: Any) -> None:
        threads = self.threads
        blocks = iter(self.runner)
        run, n = self.run_options, self.runner.n_blocks
        for index, entries in enumerate(self.stages):
            with torch_threads(threads):
                block = next(blocks) if index > 0 else None
                if block is not None:
                    run.stage(f"block {index}/{n}: calibration statistics")
                tasks = stage_tasks(entries, self.plan, block, self.gptq, self.source)
            values = executor.run(tasks, sink, collect, progress=run.on_task)
            if block is not None:
                run.stage(f"block {index}/{n}: quantized outputs")
                with torch_threads(threads):
                    block.finish({name: values[name] for name in block.linears if name in values})

    def provenance(self, calibration: CalibrationOptions, text_sha256: str) -> dict[str, Any]:
        gptq = self.gptq
        return {"calibration": {**calibration.as_dict(), "sha256": text_sha256},
                "gptq": {"damp": gptq.damp, "act_order": gptq.act_order, "block_size": gptq.block_size}}


def act_order_config(config: Any, layout: str, gptq: GPTQConfig) -> Any:
    """The method config with act-order groups (g_idx) when GPTQ runs in act-order into the gptq layout, the one
    layout that names each channel's group; elsewhere act-order only orders the rounding (static groups)."""
    if gptq.act_order and layout == "gptq" and isinstance(config, Int4Config):
        return replace(config, desc_act=True)
    return config


def quantize_calibrated(request: QuantizeRequest, calibration: CalibrationOptions, gptq: GPTQConfig,
                        run: RunOptions) -> QuantizeReport:
    """Quantize ``request.model`` with GPTQ into the folder ``request.out`` (module docstring)."""
    request = replace(request, config=act_order_config(request.config, request.layout, gptq))
    out = request.out
    assert out is not None
    check_output(out, force=request.force, inputs=[request.model])
    with open_model(request.model) as reader:
        plan = plan_quantize(reader, request)
        show_warnings(plan)
        tokens, text_sha256 = calibration_tokens(request.model, calibration, [])
        calibrated = CalibratedRun(reader, plan, tokens, gptq, run)
        report = QuantizeReport(method=plan.method, parameters=algorithm_parameters(plan), format=plan.format.name,
                                bytes_before=weight_file_bytes(reader), bytes_after=plan.output_bytes,
                                notes=plan_notes(plan))
        run.start(f"{plan.method} ({describe_config(plan.config)}, gptq)", plan.input_bytes, len(plan.entries))
        with FolderSink(out, force=request.force, specs=plan.output_specs(), shard_bytes=request.shard_bytes) as sink, \
                Executor(run.executor, sources={"model": ModelSource(str(request.model))}, opened={"model": reader},
                         device=run.device) as executor:
            calibrated.run(executor, sink, report.add)
            report.notes += requantized_note(reader)
            sink.close_weights()
            report.bytes_after = folder_weight_bytes(sink.folder)
            write_quantized_files(sink.folder, plan, reader, report)
            write_report(sink.folder, report)
            write_provenance(sink.folder / "compress_provenance.json", run, "quantize", request.model, out,
                             {"method": request.method, "parameters": algorithm_parameters(plan),
                              "format": request.layout, **calibrated.provenance(calibration, text_sha256),
                              "shard_size": request.shard_bytes, "execution": executor.stats.as_dict()})
            sink.commit()
    return report
