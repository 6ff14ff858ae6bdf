"""A base checkpoint with LoRA adapters merged in, read one tensor at a time, and the merge report.

:class:`MergedReader` wraps the base reader (any reader from ``open_model``, so quantized NF4/INT4 outputs are
dequantized first) and yields merged float tensors from ``get(name)``: it is a :class:`CheckpointReader`, so
every writing path (a float checkpoint, any quantized layout, a GGUF file) reads it like any input, and
:class:`MergedSource` lets a worker open it by itself. Each merged tensor comes with its report row
(:meth:`MergedReader.report_row`).

Per tensor ``W`` (float32) touched by adapters ``k`` with weights ``w_k``:

- each adapter's own result is PEFT's: ``T_k = R_k + dW_k`` (``R_k``: the full tensor the adapter
  carries for it, else ``W``), or DoRA's ``m / ||R_k + dW_k|| * (R_k + dW_k)``;
- one adapter with weight 1 under an exact method (sum, cat) writes ``T_k`` itself, which is
  what PEFT's ``merge_and_unload`` produces (bit for bit for float32 adapters and bases);
- otherwise the method combines the dense deltas ``d_k = T_k - W`` (``dW_k`` exactly when there
  is no full tensor and no DoRA) into ``D``, and the result is ``W + D``. A DoRA adapter enters a
  combination through the change it makes, ``d_k = T_k - W``.

Merged tensors are cast to the base tensor's dtype only at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.inputs import open_model
from compress.formats.peft_adapter import read_adapter
from compress.merge.combine import weighted_sum
from compress.merge.lora import LoraModule, bias_delta, dora_merge, module_delta, qalora_group_delta
from compress.metrics import frobenius_norm
from compress.pipeline.merge_plan import Contribution, MergeOptions, MergePlan, plan_merge
from compress.pipeline.report import human_bytes
from compress.pipeline.tasks import Source


@dataclass
class MergeRow:
    """One merged tensor in the report."""

    tensor: str
    shape: tuple[int, ...]
    dtype: str
    adapters: list[str]
    kinds: list[str]
    method: str  # the combine method, or "exact" (one adapter at weight 1: PEFT's own result)
    delta_rel: float  # ||W' - W||_F / ||W||_F, float32
    dtype_loss: float  # ||cast(W') - W'|| / ||W' - W||: the part of the change lost to the output dtype
    deviation_from_sum: float | None  # ||D - sum_k w_k d_k|| / ||sum_k w_k d_k|| for ties/dare/svd

    def as_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "shape": list(self.shape), "dtype": self.dtype, "adapters": self.adapters,
                "kinds": self.kinds, "method": self.method, "delta_rel_to_base": self.delta_rel,
                "delta_lost_to_dtype": self.dtype_loss, "deviation_from_weighted_sum": self.deviation_from_sum}


@dataclass
class MergedTensor:
    """The float32 pieces of one merged tensor (on the reader's device): the base ``W``, the merged
    ``merged`` and the combined change ``delta`` (``merged - W`` up to float32 rounding; exactly the
    LoRA delta when one plain LoRA adapter is merged)."""

    W: torch.Tensor
    merged: torch.Tensor
    delta: torch.Tensor
    row: MergeRow


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class MergedReader(CheckpointReader):
    """The base checkpoint with the adapters merged in: same tensor names, shapes and dtypes.

    ``get(name)`` returns the merged tensor in the base tensor's dtype (untouched tensors come
    straight from the base); ``merge_tensor(name)`` gives the float32 pieces. Every merged tensor
    produced adds (or refreshes) its row in ``rows``, which :meth:`report_row` hands out.
    """

    def __init__(self, base: CheckpointReader, plan: MergePlan, *, device: torch.device | None = None) -> None:
        self.base = base
        self.plan = plan
        self.path = base.path
        self.config = base.config
        self.device = device or torch.device("cpu")
        self.rows: dict[str, MergeRow] = {}

    def infos(self) -> list[TensorInfo]:
        return list(self.plan.infos)

    def extra_files(self) -> dict[str, bytes | Path]:
        return self.base.extra_files()

    def close(self) -> None:
        self.base.close()

    def is_merged(self, name: str) -> bool:
        return name in self.plan.tensors

    def get(self, name: str) -> torch.Tensor:
        tm = self.plan.tensors.get(name)
        if tm is None:
            return self.base.get(name)
        return self.merge_tensor(name).merged.to("cpu", tm.info.dtype)

    def group_delta(self, name: str) -> tuple[torch.Tensor, int] | None:
        """For a weight that only QA-LoRA modules of one group size change, combined by an exact method
        (sum, cat): ``(sum_k w_k G_k, g)`` with ``G_k`` [out, in/g] the per-group deltas
        (:func:`~compress.merge.lora.qalora_group_delta`); None otherwise."""
        tm = self.plan.tensors.get(name)
        if tm is None or not self.plan.options.method.exact_sum:
            return None
        if any(c.kind != "qalora" for c in tm.contributions):
            return None
        entries = [(self.plan.adapters[c.adapter].modules[c.module], self.plan.weights[c.adapter])
                   for c in tm.contributions]
        sizes = {e.group_size for e, _ in entries}
        if len(sizes) != 1:
            return None
        groups = [qalora_group_delta(e, self.plan.options.qalora_pooling, device=self.device) for e, _ in entries]
        g = sizes.pop()
        assert g is not None
        return weighted_sum(groups, [w for _, w in entries]), g

    def merge_tensor(self, name: str) -> MergedTensor:
        """Merge one tensor (see the module docstring) and record its report row."""
        tm = self.plan.tensors[name]
        plan, method, pooling = self.plan, self.plan.options.method, self.plan.options.qalora_pooling
        W = self.base.get(name).to(self.device).float()
        per_adapter: dict[int, list[Contribution]] = {}
        for c in tm.contributions:
            per_adapter.setdefault(c.adapter, []).append(c)
        targets: list[torch.Tensor] = []
        deltas: list[torch.Tensor] = []
        ranks: list[int | None] = []
        weights: list[float] = []
        for k, contributions in per_adapter.items():
            adapter = plan.adapters[k]
            R: torch.Tensor | None = None
            entry: LoraModule | None = None
            dW: torch.Tensor | None = None
            for c in contributions:
                if c.kind == "replace":
                    R = adapter.replacements[name].to(self.device).float()
                elif c.kind == "bias":
                    dW = bias_delta(adapter.modules[c.module], device=self.device)
                else:
                    entry = adapter.modules[c.module]
            start = W if R is None else R
            if entry is not None:
                dW = module_delta(entry, start, qalora_pooling=pooling)
            if entry is not None and entry.is_dora:
                target = dora_merge(entry, start, dW)
                delta = target - W
            else:
                target = start if dW is None else start + dW
                delta = (R - W if dW is None else (R - W) + dW) if R is not None else dW
            assert delta is not None
            targets.append(target)
            deltas.append(delta)
            ranks.append(entry.rank if entry is not None and R is None and not entry.is_dora else None)
            weights.append(plan.weights[k])
        exact = len(targets) == 1 and weights[0] == 1.0 and method.exact_sum
        deviation = None
        if exact:
            merged, D = targets[0], deltas[0]
        else:
            D = method.combine(deltas, weights, key=name, ranks=ranks)
            merged = W + D
            if not method.exact_sum:
                reference = weighted_sum(deltas, weights)
                deviation = _ratio(frobenius_norm(D - reference), frobenius_norm(reference))
        if not bool(torch.isfinite(merged).all()):
            raise InputError(f"merging produced non-finite values in '{name}'", where=str(self.path),
                             fix="The base has NaN/inf values or a DoRA norm is zero; check the base with "
                                 "`compress inspect`.")
        change = frobenius_norm(merged - W)
        lost = 0.0
        if tm.info.dtype != torch.float32:
            lost = _ratio(frobenius_norm(merged.to(tm.info.dtype).float() - merged), change)
        row = MergeRow(tensor=name, shape=tm.info.shape, dtype=dtype_name(tm.info.dtype),
                       adapters=[plan.label(k) for k in per_adapter], kinds=sorted({c.kind for c in tm.contributions}),
                       method="exact" if exact else method.describe(),
                       delta_rel=_ratio(change, frobenius_norm(W)), dtype_loss=lost, deviation_from_sum=deviation)
        self.rows[name] = row
        return MergedTensor(W=W, merged=merged, delta=D, row=row)

    def report_row(self, name: str) -> MergeRow | None:
        """The row of a tensor merged by ``get`` (handed out once), else None."""
        return self.rows.pop(name, None)


@dataclass(frozen=True)
class MergedSource(Source):
    """How a worker opens the merged model by itself: the base, the adapter folders and the options."""

    base: str
    adapters: tuple[str, ...]
    options: MergeOptions

    def open(self, device: torch.device) -> CheckpointReader:
        base = open_model(self.base)
        try:
            plan = plan_merge(base, [read_adapter(p) for p in self.adapters], self.options)
        except BaseException:
            base.close()
            raise
        return MergedReader(base, plan, device=device)


@dataclass
class MergeReport:
    plan: dict[str, Any]  # MergePlan.as_dict(): method, weights, adapters
    rows: list[MergeRow]
    tensors_unchanged: int = 0
    notes: list[str] = field(default_factory=list)
    bytes_written: int = 0

    @classmethod
    def start(cls, plan: MergePlan) -> MergeReport:
        """An empty report of ``plan``, to :meth:`add` rows to in plan order."""
        return cls(plan=plan.as_dict(), rows=[], tensors_unchanged=len(plan.infos), notes=list(plan.notes))

    def add(self, row: MergeRow) -> None:
        self.rows.append(row)
        self.tensors_unchanged -= 1

    def totals(self) -> dict[str, Any]:
        worst = max(self.rows, key=lambda r: (r.delta_rel, r.tensor), default=None)
        deviations = [r.deviation_from_sum for r in self.rows if r.deviation_from_sum is not None]
        return {
            "tensors_merged": len(self.rows), "tensors_unchanged": self.tensors_unchanged,
            "params_merged": sum(math.prod(r.shape) for r in self.rows),
            "mean_delta_rel": sum(r.delta_rel for r in self.rows) / len(self.rows) if self.rows else 0.0,
            "max_delta_rel": worst.delta_rel if worst else 0.0, "max_delta_tensor": worst.tensor if worst else None,
            "max_delta_lost_to_dtype": max((r.dtype_loss for r in self.rows), default=0.0),
            "mean_deviation_from_weighted_sum": sum(deviations) / len(deviations) if deviations else None,
            "bytes_written": self.bytes_written,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.plan["method"], "weights": self.plan["weights"],
                "qalora_pooling": self.plan["qalora_pooling"], "adapters": self.plan["adapters"],
                "totals": self.totals(), "notes": self.notes, "tensors": [r.as_dict() for r in self.rows]}

    def to_markdown(self) -> str:
        t = self.totals()
        method = self.plan["method"]
        options = ", ".join(f"{k}={v}" for k, v in method.items() if k != "method" and v is not None)
        lines = ["# Merge report", "", f"Method: `{method['method']}` ({options or 'no options'}); "
                 f"QA-LoRA pooling: `{self.plan['qalora_pooling']}`.", "",
                 "| adapter | weight | modules | ranks | features |", "|---|---|---|---|---|"]
        for a in self.plan["adapters"]:
            lines.append(f"| `{a['label']}` | {a['weight']:g} | {a['modules']} | {a['ranks']} | "
                         f"{', '.join(a['features'])} |")
        lines += ["", "| total | value |", "|---|---|",
                  f"| tensors merged / unchanged | {t['tensors_merged']} / {t['tensors_unchanged']} |",
                  f"| parameters merged | {t['params_merged']:,} |",
                  f"| ‖ΔW‖/‖W‖ mean / max | {t['mean_delta_rel']:.4g} / {t['max_delta_rel']:.4g} "
                  f"(`{t['max_delta_tensor']}`) |",
                  f"| largest share of a change lost to the output dtype | {t['max_delta_lost_to_dtype']:.3g} |"]
        if t["mean_deviation_from_weighted_sum"] is not None:
            lines.append("| mean deviation from the exact weighted sum | "
                         f"{t['mean_deviation_from_weighted_sum']:.4g} |")
        lines.append("")
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        lines += ["## Tensors", "", "| tensor | shape | adapters | kinds | method | ‖ΔW‖/‖W‖ | lost to dtype | "
                  "vs weighted sum |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            dev = "-" if r.deviation_from_sum is None else f"{r.deviation_from_sum:.4g}"
            lines.append(f"| `{r.tensor}` | {list(r.shape)} | {', '.join(r.adapters)} | {', '.join(r.kinds)} | "
                         f"{r.method} | {r.delta_rel:.4g} | {r.dtype_loss:.3g} | {dev} |")
        return "\n".join(lines) + "\n"

    def rich_tables(self, limit: int = 15) -> list[Any]:
        from rich.table import Table

        t = self.totals()
        rows = sorted(self.rows, key=lambda r: (-r.delta_rel, r.tensor))
        table = Table(title="merged tensors, largest relative change first"
                      + (f" (top {limit} of {len(rows)})" if len(rows) > limit else ""))
        table.add_column("tensor", overflow="fold", min_width=24)
        for col in ("adapters", "kinds", "method", "‖ΔW‖/‖W‖", "lost to dtype"):
            table.add_column(col, justify="right" if col.startswith(("‖", "lost")) else "left")
        for r in rows[:limit]:
            table.add_row(r.tensor, ", ".join(r.adapters), ", ".join(r.kinds), r.method, f"{r.delta_rel:.4g}",
                          f"{r.dtype_loss:.3g}")
        summary = Table(title="totals", show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        summary.add_row("tensors merged / unchanged", f"{t['tensors_merged']} / {t['tensors_unchanged']}")
        summary.add_row("parameters merged", f"{t['params_merged']:,}")
        summary.add_row("‖ΔW‖/‖W‖ mean / max", f"{t['mean_delta_rel']:.4g} / {t['max_delta_rel']:.4g}")
        if t["mean_deviation_from_weighted_sum"] is not None:
            summary.add_row("deviation from weighted sum", f"{t['mean_deviation_from_weighted_sum']:.4g}")
        if t["bytes_written"]:
            summary.add_row("written", human_bytes(t["bytes_written"]))
        return [table, summary]
