"""`compress merge --quantize`: merged weights written in a quantized layout, by the best strategy per tensor.

The quantize plan (``make_plan`` on the merged reader's tensors) decides which tensors are quantized
and how they are packed; for each of them this module decides *how* the merged weight is obtained
(:mod:`compress.merge.requant`):

- tensors no adapter touches are passed through from a quantized base when the base already holds
  them in the output's method and parameters (no second rounding), else quantized from the float
  base, else from the dequantized base;
- merged tensors are produced by every applicable strategy and the one closest to the *ideal* is
  kept (``--strategy auto``), or by the strategy the user names. The ideal is what the adapter was
  trained against, plus the update: for an update that is constant inside the output's INT4 groups
  (QA-LoRA) the quantized base plus the update (a float base is quantized first, so the update can
  be folded exactly); otherwise the float base plus the update when a float base is available; else
  the dequantized quantized base plus the update.

Per merged tensor the report gives the strategy, every strategy's error, the relative error against
the ideal, the cosine between the update actually realised (dequant(merged) - dequant(quantized
base)) and the intended one, the fraction of the update lost, and the update's size against the
quantization step -- an update well under half a step is mostly lost to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats import FORMATS
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader
from compress.formats.quantized import DequantizingReader
from compress.formats.sink import encode
from compress.merge.requant import (
    STRATEGIES,
    MergeOutcome,
    applicable,
    as_affine,
    best_merge,
    is_group_constant,
    to_integer_zeros,
)
from compress.metrics import frobenius_norm
from compress.pipeline.merged import MergedReader, MergeRow
from compress.pipeline.plan import Plan
from compress.pipeline.report import KeptRow, TensorRow
from compress.pipeline.tasks import CopyTensor, Task, TaskContext, TaskResult
from compress.quant import METHODS
from compress.quant.base import QuantizedTensor
from compress.quant.int4 import AffineInt4Tensor, Int4Config, Int4Tensor
from compress.quant.nf4 import NF4Config, NF4Tensor

# What each folder layout stores per group besides the scale (for folding updates into it).
OFFSETS_BY_FORMAT = {"native": "float", "gptq": "integer", "compressed-tensors": "integer", "bnb": "none"}
MOSTLY_LOST = 0.5  # an update of which more than half (in norm) did not reach the merged weight


@dataclass
class RequantRow:
    """How one merged tensor was quantized, and what reached the weights."""

    tensor: str
    strategy: str
    ideal: str  # "float base + update" | "quantized base + update"
    rel_error: float  # ||W' - ideal|| / ||ideal||
    tried: dict[str, float]  # strategy -> relative error against the ideal
    update_rel: float  # ||dW|| / ||ideal||
    realised_cosine: float  # cos(dequant(W') - dequant(quantized base), dW)
    update_lost: float  # 1 - <realised, dW> / ||dW||^2 clamped to [0, 1]: the share of dW missing, along dW
    update_over_step: float  # rms(dW) / mean quantization step

    def as_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "strategy": self.strategy, "ideal": self.ideal, "rel_error": self.rel_error,
                "strategies_tried": self.tried, "update_rel": self.update_rel,
                "realised_cosine": self.realised_cosine, "update_lost": self.update_lost,
                "update_over_step": self.update_over_step}


@dataclass(frozen=True)
class PassedThrough:
    """Report row: an untouched tensor written as the quantized base held it (no second rounding)."""

    tensor: str


@dataclass
class RequantReport:
    strategy: str
    rows: list[RequantRow] = field(default_factory=list)
    passed_through: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, row: RequantRow | PassedThrough) -> None:
        if isinstance(row, PassedThrough):
            self.passed_through += 1
        else:
            self.rows.append(row)

    def totals(self) -> dict[str, Any]:
        rows = self.rows
        used: dict[str, int] = {}
        for r in rows:
            used[r.strategy] = used.get(r.strategy, 0) + 1
        lost = [r for r in rows if r.update_lost > MOSTLY_LOST]
        worst = max(rows, key=lambda r: (r.update_lost, r.tensor), default=None)
        return {"tensors": len(rows), "strategies_used": used, "passed_through_unchanged": self.passed_through,
                "mean_rel_error": sum(r.rel_error for r in rows) / len(rows) if rows else 0.0,
                "max_rel_error": max((r.rel_error for r in rows), default=0.0),
                "mean_update_lost": sum(r.update_lost for r in rows) / len(rows) if rows else 0.0,
                "min_realised_cosine": min((r.realised_cosine for r in rows), default=1.0),
                "tensors_mostly_lost": len(lost),
                "worst_tensor": worst.tensor if worst else None}

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "totals": self.totals(), "notes": self.notes,
                "tensors": [r.as_dict() for r in sorted(self.rows, key=lambda r: (-r.update_lost, r.tensor))]}

    def to_markdown(self, limit: int = 40) -> str:
        t = self.totals()
        used = ", ".join(f"{k} {v}" for k, v in t["strategies_used"].items()) or "-"
        lines = ["## Quantized merge", "",
                 f"Strategy: `{self.strategy}` (used: {used}; {t['passed_through_unchanged']} untouched tensors "
                 "passed through without re-rounding).", "",
                 f"- mean / max relative error against the ideal: {t['mean_rel_error']:.4g} / {t['max_rel_error']:.4g}",
                 f"- mean fraction of the update lost: {t['mean_update_lost']:.3f}; lowest cosine between realised "
                 f"and intended update: {t['min_realised_cosine']:.4f}",
                 f"- tensors whose update was mostly lost to rounding (> {MOSTLY_LOST:.0%} of its norm): "
                 f"**{t['tensors_mostly_lost']}** of {t['tensors']}", ""]
        lines += [f"- note: {n}" for n in self.notes]
        lines += ["", "| tensor | strategy | ideal | rel. error | update / weight | update / step | realised cos | "
                  "update lost |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: (-r.update_lost, r.tensor))[:limit]:
            lines.append(f"| `{r.tensor}` | {r.strategy} | {r.ideal} | {r.rel_error:.4g} | {r.update_rel:.3g} | "
                         f"{r.update_over_step:.3g} | {r.realised_cosine:.4f} | {r.update_lost:.3f} |")
        return "\n".join(lines) + "\n"


def _mean_step(qt: QuantizedTensor) -> float:
    """The average distance between neighbouring levels of ``qt``."""
    if isinstance(qt, Int4Tensor | AffineInt4Tensor):
        return float(qt.scales.mean())
    if isinstance(qt, NF4Tensor):
        return float(qt.absmax_float().mean()) * 2 / 15  # NF4 levels span [-absmax, absmax] in 15 gaps
    return float("nan")


def _compatible_int4(qt: QuantizedTensor | None, config: Any) -> bool:
    return (isinstance(qt, Int4Tensor | AffineInt4Tensor) and isinstance(config, Int4Config)
            and qt.group_size == config.group_size and qt.scale_dtype == config.scale_dtype)


def _pass_through(base_q: QuantizedTensor | None, config: Any, offsets: str) -> QuantizedTensor | None:
    """The base's quantized tensor itself, when the output can hold it exactly; else None."""
    if base_q is None:
        return None
    if isinstance(config, NF4Config) and isinstance(base_q, NF4Tensor):
        same = (base_q.block_size == config.block_size and base_q.quant_type == config.quant_type
                and base_q.double_quant == config.double_quant)
        return base_q if same else None
    if not _compatible_int4(base_q, config):
        return None
    if offsets == "float":
        return as_affine(base_q)
    if isinstance(base_q, Int4Tensor) and base_q.symmetric == config.symmetric:
        return base_q
    converted = to_integer_zeros(as_affine(base_q), symmetric=config.symmetric)
    exact = torch.equal(converted.dequantize(torch.float32), base_q.dequantize(torch.float32))
    return converted if exact and not config.symmetric else None


def check_float_base(float_base: CheckpointReader, plan: Plan) -> None:
    """InputError unless ``float_base`` has every tensor ``plan`` quantizes, with the same shape (from its
    index: no tensor is read)."""
    shapes = {i.name: tuple(i.shape) for i in float_base.infos()}
    fix = "Pass the float checkpoint the base was quantized from."
    missing = [e.info.name for e in plan.quantized if e.info.name not in shapes]
    if missing:
        raise InputError(f"--float-base has no tensor '{missing[0]}' ({len(missing)} missing)",
                         where=str(float_base.path), fix=fix)
    wrong = [e.info for e in plan.quantized if shapes[e.info.name] != tuple(e.info.shape)]
    if wrong:
        raise InputError(f"--float-base tensor '{wrong[0].name}' has shape {list(shapes[wrong[0].name])}, the "
                         f"base has {list(wrong[0].shape)} ({len(wrong)} differ)", where=str(float_base.path), fix=fix)


def offsets_of(layout: str, config: Any) -> str:
    """What the layout stores per group besides the scale: 'float', 'integer' or 'none'."""
    offsets = OFFSETS_BY_FORMAT.get(layout, "none")
    if offsets == "integer" and getattr(config, "symmetric", False):
        offsets = "none"  # symmetric layouts fix the zero point at 8
    return offsets


@dataclass(frozen=True)
class MergeQuantizeTensor(Task):
    """One quantized tensor of ``merge --quantize`` into a folder layout: passed through from a quantized base,
    quantized from the float or dequantized base, or (when an adapter changes it) merged by the best strategy
    (see the module docstring). Rows: the quantization row, and for a merged tensor its merge and requant
    rows; ``float_base``: whether the input "float_base" (--float-base) is there."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    method: str
    config: Any
    layout: str
    outputs: tuple[str, ...]
    strategy: str
    float_base: bool

    def run(self, ctx: TaskContext) -> TaskResult:
        name, config = self.name, self.config
        merged = ctx.reader("merged")
        assert isinstance(merged, MergedReader)
        base = merged.base
        base_quantized = isinstance(base, DequantizingReader)
        base_q = base.quantized(name) if base_quantized and base.is_quantized(name) else None  # type: ignore[attr-defined]
        offsets = offsets_of(self.layout, config)
        rows: list[Any] = []

        def quantize(x: torch.Tensor) -> QuantizedTensor:
            return METHODS[self.method].quantize(x, config)

        fast = (_fast_fold(merged, name, base_q, config) if self.strategy in ("auto", "fold") and offsets == "float"
                else None)
        float_W = None
        if self.float_base and fast is None:  # an exact fold needs no float weights: don't read them
            float_W = ctx.read("float_base", name).to(ctx.device).float()
        if fast is not None:  # a QA-LoRA update into float offsets, computed per group (no dense pass)
            qt, metrics, requant_row, merge_row = fast
            rows += [merge_row, requant_row]
        elif not merged.is_merged(name):
            qt = _pass_through(base_q, config, offsets)
            if qt is not None:
                rows.append(PassedThrough(name))
                reference = base_q.dequantize(torch.float32) if float_W is None else float_W  # type: ignore[union-attr]
            else:
                source = float_W if float_W is not None else base.get(name).to(ctx.device).float()
                qt, reference = quantize(source), source
            metrics = qt.error_against(reference)
        else:
            qt, metrics, requant_row, merge_row = self._merge(merged, base_q, float_W, quantize, offsets)
            rows += [merge_row, requant_row]
        packed = FORMATS[self.layout].pack(name, qt.to("cpu"))  # type: ignore[attr-defined]
        note = rows[-1].strategy if merged.is_merged(name) else ""
        rows.append(TensorRow(name, self.shape, dtype_name(self.dtype), qt.bits_per_weight, metrics, note=note))
        return TaskResult([(n, encode(packed[n])) for n in self.outputs], rows)

    def _merge(self, merged: MergedReader, base_q: QuantizedTensor | None, float_W: torch.Tensor | None,
               quantize: Callable[[torch.Tensor], QuantizedTensor],
               offsets: str) -> tuple[QuantizedTensor, Any, RequantRow, Any]:
        """A tensor an adapter changes: every applicable strategy, the one closest to the ideal kept."""
        name, config, strategy = self.name, self.config, self.strategy
        base_quantized = isinstance(merged.base, DequantizingReader)
        candidates = STRATEGIES if strategy == "auto" else (strategy,)
        mt = merged.merge_tensor(name)
        dW = mt.delta.float()
        if not base_quantized:
            float_W = mt.W
        usable_q = base_q if (base_q is None or _compatible_int4(base_q, config)
                              or isinstance(base_q, NF4Tensor)) else None
        qalora = (isinstance(config, Int4Config) and is_group_constant(dW, config.group_size)
                  and (usable_q is None or isinstance(usable_q, Int4Tensor | AffineInt4Tensor)))
        if qalora and usable_q is None and float_W is not None:
            usable_q = quantize(float_W)  # QA-LoRA on a float base: quantize the base, then fold
            if isinstance(usable_q, Int4Tensor) and offsets == "integer":
                usable_q = Int4Tensor(**{**vars(usable_q), "symmetric": False})
        if qalora and usable_q is not None:
            deq_base = usable_q.dequantize(torch.float32)
            ideal, ideal_kind = deq_base + dW, "quantized base + update"
        elif float_W is not None:
            ideal, ideal_kind = float_W + dW, "float base + update"
            deq_base = (usable_q.dequantize(torch.float32) if usable_q is not None
                        else quantize(float_W).dequantize(torch.float32))
        else:
            deq_base = mt.W
            ideal, ideal_kind = mt.W + dW, "quantized base + update"
        fold_base = usable_q if isinstance(usable_q, Int4Tensor | AffineInt4Tensor) else None
        deq_quantized = mt.W if base_quantized else (deq_base if fold_base is not None else None)
        outcome = _merge_one(dW, ideal, fold_base, float_W, deq_quantized, quantize, offsets, candidates)
        if outcome is None:  # only a named strategy can fail to apply: say why, write nothing
            group_constant = fold_base is not None and is_group_constant(dW, fold_base.group_size)
            why = applicable(strategy, base_q=fold_base, has_float=float_W is not None,
                             has_dequantized=deq_quantized is not None, group_constant=group_constant,
                             output_offsets=offsets)
            raise OptionError(f"--strategy {strategy} cannot merge '{name}': {why}",
                              fix="Use --strategy auto (the best applicable strategy per tensor), or see "
                                  "`compress merge --help` for what each strategy needs.")
        qt, metrics = outcome.tensor, outcome.metrics
        realised = qt.dequantize(torch.float32) - deq_base
        d_norm = frobenius_norm(dW)
        r_norm = frobenius_norm(realised)
        inner = (r_norm**2 + d_norm**2 - frobenius_norm(realised - dW) ** 2) / 2
        lost = share_lost(inner, d_norm)
        cosine = inner / (r_norm * d_norm) if r_norm > 0 and d_norm > 0 else (1.0 if d_norm == 0 else 0.0)
        step = _mean_step(qt)
        rms = d_norm / math.sqrt(dW.numel()) if dW.numel() else 0.0
        ideal_norm = frobenius_norm(ideal)
        requant_row = RequantRow(
            tensor=name, strategy=outcome.strategy, ideal=ideal_kind, rel_error=metrics.rel_fro,
            tried=outcome.tried, update_rel=d_norm / ideal_norm if ideal_norm > 0 else 0.0,
            realised_cosine=max(-1.0, min(1.0, cosine)), update_lost=lost,
            update_over_step=rms / step if step > 0 else math.inf)
        return qt, metrics, requant_row, mt.row


def merge_quantize_tasks(plan: Plan, *, strategy: str, float_base: bool) -> list[Task]:
    """One task per planned tensor; kept tensors are copied from the merged model (with their merge row)."""
    tasks: list[Task] = []
    for entry in plan.entries:
        info = entry.info
        if not entry.quantize:
            tasks.append(CopyTensor(info.name, info.nbytes, "merged", info.shape, info.dtype,
                                    row=KeptRow(info.name, info.shape, dtype_name(info.dtype), entry.reason)))
            continue
        tasks.append(MergeQuantizeTensor(info.name, info.nbytes, info.shape, info.dtype, plan.method, plan.config,
                                         plan.format.name, tuple(s.name for s in entry.outputs), strategy, float_base))
    return tasks


def share_lost(inner: float, d_norm: float) -> float:
    """The share of the intended update dW missing from the realised change, measured along dW:
    1 - <realised, dW> / ||dW||^2, clamped to [0, 1] (0: all of it arrived; 1: none, or only noise across it)."""
    if d_norm <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - inner / d_norm**2))


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def finish_requant_notes(requant: RequantReport, layout: str, config: Any) -> None:
    """The notes that follow from all the rows: rounded integer offsets, updates mostly lost."""
    if offsets_of(layout, config) == "integer" and any(r.strategy.startswith(("fold", "refit")) for r in requant.rows):
        requant.notes.append(f"{layout} stores integer zero points, so folded offsets were rounded to whole "
                             "steps (see each tensor's error); --format native keeps them exact")
    lost = requant.totals()["tensors_mostly_lost"]
    if lost:
        had_float = any(r.ideal == "float base + update" for r in requant.rows)
        ways = ["a QA-LoRA adapter (folded exactly)", *([] if had_float else ["the float base (--float-base)"]),
                "a smaller group size", "8 bits"]
        requant.notes.append(f"{lost} tensors lost most of their update to rounding: the update is small against "
                             f"the quantization step. {upper_first(', '.join(ways[:-1]))} or {ways[-1]} would keep "
                             "more of it")


def _merge_one(dW: torch.Tensor, ideal: torch.Tensor, base_q: QuantizedTensor | None, float_W: torch.Tensor | None,
               deq_quantized: torch.Tensor | None, quantize: Callable[[torch.Tensor], QuantizedTensor], offsets: str,
               candidates: tuple[str, ...]) -> MergeOutcome | None:
    try:
        return best_merge(dW, ideal, base_q=base_q, base_float=float_W, quantize=quantize, output_offsets=offsets,
                          base_dequantized=deq_quantized, strategies=candidates)
    except ValueError:
        return None


def _fast_fold(merged: MergedReader, name: str, base_q: QuantizedTensor | None,
               config: Any) -> tuple[AffineInt4Tensor, Any, RequantRow, Any] | None:
    """The fold of a QA-LoRA update into an INT4 base's float offsets, done at group resolution.

    A QA-LoRA update is one number per (row, group) (:meth:`MergedReader.group_delta`), so the fold and
    every figure of the report follow from [out, n_groups] tensors and per-group sums of the codes: no
    dense update, dequantized base or ideal is ever formed. Same weights as the dense path, bit for bit
    (the dense update is this one repeated); the error against the ideal is float32's rounding of
    offset + update, measured per group. None when the tensor is not such a case.
    """
    from compress.metrics import ErrorMetrics

    if not merged.is_merged(name) or not _compatible_int4(base_q, config):
        return None
    grouped = merged.group_delta(name)
    if grouped is None:
        return None
    G_adapter, g = grouped
    aff = as_affine(base_q)  # type: ignore[arg-type]
    Gb = aff.group_size
    if g % Gb or aff.shape[1] % Gb:
        return None
    D = G_adapter.float().repeat_interleave(g // Gb, dim=1) if g != Gb else G_adapter.float()
    if tuple(D.shape) != tuple(aff.offsets.shape):
        return None
    new_offsets = aff.offsets + D
    folded = AffineInt4Tensor(shape=aff.shape, dtype=aff.dtype, codes=aff.codes, scales=aff.scales,
                              offsets=new_offsets, group_size=Gb, scale_dtype=aff.scale_dtype)
    # per-group sums of the codes give exact norms of s*q + m for any offset m
    q = aff.codes.float().reshape(aff.shape[0], -1, Gb)
    sq, sqq = q.sum(-1).double(), (q * q).sum(-1).double()
    s64, m64, d64 = aff.scales.double(), aff.offsets.double(), D.double()

    def norm2(offset: torch.Tensor) -> float:
        return float((s64 * s64 * sqq + 2 * s64 * offset * sq + Gb * offset * offset).sum())

    ideal_off = m64 + d64  # exact: the ideal weight is s*q + m + d
    err_g = new_offsets.double() - ideal_off  # float32 rounding of m + d, per group
    ideal_norm = math.sqrt(norm2(ideal_off))
    err_norm = math.sqrt(Gb * float((err_g * err_g).sum()))
    merged_norm = math.sqrt(norm2(new_offsets.double()))
    rel = err_norm / ideal_norm if ideal_norm > 0 else 0.0
    cos = ((ideal_norm**2 + merged_norm**2 - err_norm**2) / (2 * ideal_norm * merged_norm)
           if ideal_norm > 0 and merged_norm > 0 else 1.0)
    metrics = ErrorMetrics(rel_fro=rel, sqnr_db=(20 * math.log10(ideal_norm / err_norm) if err_norm > 0 else math.inf),
                           max_abs=float(err_g.abs().max()), cosine=max(-1.0, min(1.0, cos)))
    realised = new_offsets.double() - m64
    d_norm = math.sqrt(Gb * float((d64 * d64).sum()))
    r_norm = math.sqrt(Gb * float((realised * realised).sum()))
    inner = Gb * float((realised * d64).sum())
    base_norm = math.sqrt(norm2(m64))
    step = float(aff.scales.mean())
    rms = d_norm / math.sqrt(aff.numel)
    requant_row = RequantRow(
        tensor=name, strategy="fold", ideal="quantized base + update", rel_error=rel, tried={"fold": rel},
        update_rel=d_norm / ideal_norm if ideal_norm > 0 else 0.0,
        realised_cosine=inner / (r_norm * d_norm) if r_norm > 0 and d_norm > 0 else 1.0,
        update_lost=share_lost(inner, d_norm), update_over_step=rms / step if step > 0 else math.inf)
    tm = merged.plan.tensors[name]
    plan = merged.plan
    exact = len(tm.adapters) == 1 and plan.weights[tm.adapters[0]] == 1.0
    merge_row = MergeRow(tensor=name, shape=tm.info.shape, dtype=dtype_name(tm.info.dtype),
                         adapters=[plan.label(k) for k in tm.adapters], kinds=["qalora"],
                         method="exact" if exact else plan.options.method.describe(),
                         delta_rel=d_norm / base_norm if base_norm > 0 else 0.0, dtype_loss=0.0,
                         deviation_from_sum=None)
    return folded, metrics, requant_row, merge_row
