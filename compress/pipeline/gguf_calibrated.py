"""`compress quantize --format gguf --algorithm gptq`: GPTQ into llama.cpp's block types, on the one executor.

The plan is the GGUF plan with an importance matrix's recipe (llama-quantize's, as with ``--imatrix``: the
statistics GPTQ collects are one), its tensors ordered as the calibration produces them: the tensors outside the
blocks that the blocks do not need (the token embedding, norms), then block 0, 1, ..., then the output head.
Per block, :class:`GGUFGPTQTask` quantizes each weight with the H = X^T X of its inputs (the outputs of the
already quantized blocks before it):

1. the block scales are chosen first, by llama.cpp's importance-weighted search with diag(H) as the importance
   (exactly what ``--imatrix`` computes with this matrix);
2. GPTQ chooses the codes on those scales (:func:`~compress.quant.ggml_gptq.gptq_ggml`);
3. of GPTQ, the importance-searched grid and llama.cpp's plain quantization, the one with the lowest output
   error on the calibration inputs is written (the report names it).

The output head has only the diagonal of its statistics (its inputs are the last block's outputs, known once
every block is quantized): it gets the importance-weighted search, as with ``--imatrix``. ``--save-imatrix``
writes the diagonals as a llama.cpp importance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from compress.calib.runner import CalibrationRunner, LinearStatistics
from compress.formats.checkpoint import CheckpointReader
from compress.formats.gguf_names import reverse_permute_qk
from compress.formats.imatrix import ImatrixEntry, ImportanceMatrix
from compress.formats.sink import encode_packed
from compress.ggml_types import GGML_TYPES
from compress.pipeline.calibrated import block_of, torch_threads
from compress.pipeline.execute import Executor, available_cores
from compress.pipeline.gguf import GGUFPlan, GGUFTensorTask, PlannedTensor, gguf_row, not_finite
from compress.pipeline.report import TensorRow
from compress.pipeline.run import RunOptions
from compress.pipeline.tasks import Task, TaskContext, TaskResult
from compress.quant.ggml import GGMLConfig, quantize_ggml
from compress.quant.ggml_gptq import gptq_ggml
from compress.quant.gptq import GPTQConfig, output_errors


@dataclass(frozen=True)
class GGUFGPTQTask(GGUFTensorTask):
    """GPTQ of one weight into its planned llama.cpp type given the H [in, in] of its calibration inputs; returns
    the block bytes, the report row and the weight as the file reconstructs it (float32, in the checkpoint's row
    order, for the next block's inputs)."""

    H: torch.Tensor | None = None
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def run(self, ctx: TaskContext) -> TaskResult:
        planned = self.planned
        assert self.H is not None and planned.qtype in GGML_TYPES
        w = self.read_planned(ctx)
        H = self.H.to(ctx.device)
        config = GGMLConfig(planned.qtype)
        rtn = quantize_ggml(w, config)
        if not rtn.scales_finite():
            raise not_finite(self.name, planned.qtype, self.where)
        grid = quantize_ggml(w, config, importance=torch.diagonal(H).clone())
        candidates = [("gptq", gptq_ggml(w, H, grid, self.gptq)), ("imatrix", grid), ("rtn", rtn)]
        decoded = [qt.dequantize(torch.float32) for _, qt in candidates]
        errors = output_errors(w, decoded, H)
        best = min(range(len(candidates)), key=lambda i: (errors[i], i))
        used, qt = candidates[best]
        rtn_metrics = rtn.error_against(w)
        metrics = qt.error_against(w)
        row = gguf_row(planned, planned.shape, self.dtype, metrics)
        assert isinstance(row, TensorRow)
        row = replace(row, rtn=rtn_metrics, algorithm=used, output_error=errors[best], rtn_output_error=errors[-1])
        value = decoded[best]
        if planned.permute_heads is not None:  # back to the checkpoint's row order, which the runner's block uses
            value = reverse_permute_qk(value, planned.permute_heads)
        data = encode_packed(qt.packed(), planned.qtype, tuple(planned.shape))
        return TaskResult([(planned.name, data)], [row], values={self.name: value.cpu()})


def head_name(runner: CalibrationRunner) -> str:
    return f"{runner.prefix}lm_head.weight"


def gguf_stages(plan: GGUFPlan, runner: CalibrationRunner) -> list[list[PlannedTensor]]:
    """The planned tensors per stage: stage 0 outside the blocks (not the head), stage k + 1 block k, the last
    stage the output head (plan order inside each)."""
    stages: list[list[PlannedTensor]] = [[] for _ in range(runner.n_blocks + 2)]
    for t in plan.tensors:
        assert t.source is not None
        stages[-1 if t.source == head_name(runner) else block_of(t.source, runner) + 1].append(t)
    return stages


class GGUFCalibratedRun:
    """GPTQ over ``reader`` (input key ``source``) on ``tokens`` [samples, length] into the tensors of ``plan``,
    whose order it sets (the sink must be made after this)."""

    def __init__(self, reader: CheckpointReader, plan: GGUFPlan, tokens: torch.Tensor, gptq: GPTQConfig,
                 run: RunOptions, source: str = "model") -> None:
        self.plan, self.gptq, self.source, self.where = plan, gptq, source, str(reader.path)
        self.infos = {i.name: i for i in reader.infos()}
        self.threads = available_cores()  # as CalibratedRun: the forward passes get every core
        with torch_threads(self.threads):
            self.runner = CalibrationRunner(reader, tokens, run.device)
        self.stages = gguf_stages(plan, self.runner)
        plan.tensors = [t for stage in self.stages for t in stage]
        self.statistics: dict[str, LinearStatistics] = {}  # diagonals by GGUF name (--save-imatrix)

    def _task(self, t: PlannedTensor, stats: dict[str, LinearStatistics]) -> Task:
        assert t.source is not None
        info = self.infos[t.source]
        s = stats.get(t.source)
        if s is not None and t.qtype in GGML_TYPES:
            self.statistics[t.name] = LinearStatistics(torch.diagonal(s.H).clone() if s.H.dim() == 2 else s.H,
                                                       s.rows)
            if s.H.dim() == 2:
                return GGUFGPTQTask(t.source, info.nbytes, self.source, t, info.dtype, self.where, True,
                                    H=s.H, gptq=self.gptq)
            if t.qtype != "q8_0":  # diagonal only (the head): the importance-weighted search
                return GGUFTensorTask(t.source, info.nbytes, self.source, t, info.dtype, self.where, True,
                                      "optimize", s.H)
        return GGUFTensorTask(t.source, info.nbytes, self.source, t, info.dtype, self.where, True)

    def run(self, executor: Executor, sink: Any, collect: Any, run: RunOptions) -> None:
        blocks = iter(self.runner)
        last = len(self.stages) - 1
        for index, planned in enumerate(self.stages):
            block = next(blocks) if 0 < index < last else None
            with torch_threads(self.threads):
                if block is not None:
                    run.stage(f"block {index}/{last - 1}: calibration statistics")
                    stats = block.statistics()
                elif index == last:
                    next(blocks, None)  # releases the last block
                    stats = self.runner.head_statistics() if planned else {}
                else:
                    stats = {}
                tasks = [self._task(t, stats) for t in planned]
            values = executor.run(tasks, sink, collect, progress=run.on_task)
            if block is not None:
                run.stage(f"block {index}/{last - 1}: quantized outputs")
                with torch_threads(self.threads):
                    block.finish({name: values[name] for name in block.linears if name in values})

    def importance_matrix(self, chunks: int, chunk_size: int, dataset: str) -> ImportanceMatrix:
        """The diagonals of the statistics used, as a llama.cpp importance matrix."""
        entries = {name: ImatrixEntry(s.H.float().cpu().contiguous(), torch.tensor([float(s.rows)],
                                                                                   dtype=torch.float64))
                   for name, s in self.statistics.items()}
        return ImportanceMatrix(entries, chunks=chunks, datasets=(dataset,), chunk_size=chunk_size)

    def provenance(self) -> dict[str, Any]:
        g = self.gptq
        return {"damp": g.damp, "act_order": g.act_order, "block_size": g.block_size}
