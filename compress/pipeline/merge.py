"""merge: LoRA adapters into a base checkpoint, one tensor at a time.

:func:`plan_merge` matches every adapter module against the base's tensors (PEFT naming: adapter
keys ``base_model.model.<module>.lora_A.weight`` adapt the base tensor ``<module>.weight``) and
fails with the module's name when one is missing or its shape disagrees. :class:`MergedReader`
wraps the base reader (any reader from ``open_model``, so quantized NF4/INT4 outputs are
dequantized first) and yields merged float tensors from ``get(name)``: it is a
:class:`CheckpointReader`, so the float path writes it with ``ShardedWriter`` and a quantize path
can stream it through the quantization pipeline. Each merged tensor adds a row to the report.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.writer import ShardedWriter, TensorSpec, write_json
from compress.merge.adapter import (
    QALORA_POOLING,
    LoraAdapter,
    LoraModule,
    bias_delta,
    dora_merge,
    module_delta,
    qalora_group_delta,
)
from compress.merge.combine import CombineMethod, SumMethod, weighted_sum
from compress.metrics import frobenius_norm
from compress.pipeline.report import human_bytes

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Contribution:
    """What adapter ``adapter`` (an index into the plan's adapters) does to one base tensor.

    ``kind``: lora | embedding | qalora | dora (the weight of an adapted module), bias (lora_bias),
    replace (a full tensor: modules_to_save, bias="all", a saved embedding layer).
    """

    adapter: int
    kind: str
    module: str


@dataclass
class TensorMerge:
    """A base tensor that at least one adapter changes."""

    info: TensorInfo
    contributions: list[Contribution] = field(default_factory=list)

    @property
    def adapters(self) -> list[int]:
        return sorted({c.adapter for c in self.contributions})


@dataclass(frozen=True)
class MergeOptions:
    """How to combine: the method, one weight per adapter (empty: all 1.0), QA-LoRA pooling."""

    method: CombineMethod = field(default_factory=SumMethod)
    weights: tuple[float, ...] = ()
    qalora_pooling: str = "peft"

    def __post_init__(self) -> None:
        if self.qalora_pooling not in QALORA_POOLING:
            raise ValueError(f"--qalora-pooling must be one of {', '.join(QALORA_POOLING)}, "
                             f"got {self.qalora_pooling!r}")
        for w in self.weights:
            if not math.isfinite(w):
                raise ValueError(f"--weight {w} is not a finite number")


@dataclass
class MergePlan:
    adapters: list[LoraAdapter]
    options: MergeOptions
    weights: tuple[float, ...]
    infos: list[TensorInfo]  # the output tensors: the base's, in its order
    tensors: dict[str, TensorMerge]  # the base tensors the adapters change, in base order
    notes: list[str] = field(default_factory=list)

    def label(self, k: int) -> str:
        """'#1 name': the adapter's position on the command line and its folder name."""
        return f"#{k + 1} {self.adapters[k].name}"

    @property
    def touched_params(self) -> int:
        return sum(t.info.numel for t in self.tensors.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.options.method.to_dict(), "weights": list(self.weights),
            "qalora_pooling": self.options.qalora_pooling,
            "adapters": [self.adapters[k].summary() | {"label": self.label(k), "weight": self.weights[k]}
                         for k in range(len(self.adapters))],
            "tensors": [{"name": n, "shape": list(t.info.shape), "dtype": dtype_name(t.info.dtype),
                         "adapters": [self.label(k) for k in t.adapters],
                         "kinds": sorted({c.kind for c in t.contributions})} for n, t in self.tensors.items()],
            "tensors_unchanged": len(self.infos) - len(self.tensors), "params_changed": self.touched_params,
            "notes": self.notes,
        }


def _base_name(name: str | None) -> str | None:
    return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower() if name else None


def _shape_problem(entry: LoraModule, shape: tuple[int, ...]) -> str | None:
    want = entry.weight_shape
    if tuple(shape) == want:
        return None
    text = (f"the adapter's {entry.kind} LoRA (rank {entry.rank}) needs a weight of shape {list(want)} but the base "
            f"has {list(shape)}")
    if entry.kind == "linear" and tuple(shape) == want[::-1]:
        text += f" (transposed: fan_in_fan_out should be {str(not entry.fan_in_fan_out).lower()})"
    return text


def _missing_hint(base: CheckpointReader, name: str) -> tuple[str, str]:
    """(extra words, fix) for a tensor the base lacks: a tied output head gets its own explanation."""
    module = name.rsplit(".", 1)[0]
    if module.rsplit(".", 1)[-1] == "lm_head" and (base.config or {}).get("tie_word_embeddings", True):
        return ("; the base ties lm_head to its input embeddings (tie_word_embeddings) and stores only those, so "
                "changing lm_head would change the embeddings too",
                "Untie the base first (set tie_word_embeddings=false, give lm_head its own copy of the weight, "
                "save_pretrained) and merge into that.")
    return "", "The adapter was trained on a different base model; give the base it was trained on."


def plan_merge(base: CheckpointReader, adapters: list[LoraAdapter], options: MergeOptions) -> MergePlan:
    """Match every adapter's modules and full tensors against the base's tensors.

    Errors (exit code 2): a weight count that does not match the adapters (OptionError); adapters
    recorded for different base models, a module or tensor the base lacks, a shape that disagrees,
    lora_bias on a layer without bias, adapters that disagree on fan_in_fan_out (InputError).
    """
    if not adapters:
        raise OptionError("no adapter given", fix="Pass --adapter ADAPTER_FOLDER (repeat it for several).")
    if options.weights and len(options.weights) != len(adapters):
        raise OptionError(f"{len(options.weights)} --weight values for {len(adapters)} adapters",
                          fix="Give one --weight per --adapter, in the same order, or none (every weight 1.0).")
    weights = options.weights or tuple(1.0 for _ in adapters)
    recorded = {k: _base_name(a.config.base_model_name_or_path) for k, a in enumerate(adapters)}
    distinct = sorted({v for v in recorded.values() if v})
    if len(distinct) > 1:
        first = {v: k for k, v in reversed(list(recorded.items())) if v}
        a, b = distinct[:2]
        raise InputError(
            f"the adapters were trained on different base models: {adapters[first[a]].name} on "
            f"'{adapters[first[a]].config.base_model_name_or_path}', {adapters[first[b]].name} on "
            f"'{adapters[first[b]].config.base_model_name_or_path}'",
            fix="Merge only adapters of the same base; if both names are the same model, make base_model_name_or_path "
                "agree in their adapter_config.json.")
    infos = base.infos()
    by_name = {i.name: i for i in infos}
    touched: dict[str, TensorMerge] = {}
    fan_in_fan_out: dict[str, tuple[bool, int]] = {}
    notes: list[str] = []
    base_label = str(base.path)

    def add(name: str, c: Contribution) -> None:
        touched.setdefault(name, TensorMerge(by_name[name])).contributions.append(c)

    for k, adapter in enumerate(adapters):
        notes.extend(adapter.notes)
        missing = [m for m in adapter.modules.values() if m.weight_name not in by_name]
        if missing:
            more = f" ({len(missing)} of its {len(adapter.modules)} modules are missing)" if len(missing) > 1 else ""
            hint, fix = _missing_hint(base, missing[0].weight_name)
            raise InputError(f"adapter {adapter.name} adapts module '{missing[0].module}' but the base has no tensor "
                             f"'{missing[0].weight_name}'{more}{hint}", where=base_label, fix=fix)
        for entry in adapter.modules.values():
            info = by_name[entry.weight_name]
            problem = _shape_problem(entry, info.shape)
            if problem:
                raise InputError(f"adapter {adapter.name}, module '{entry.module}': {problem}", where=base_label,
                                 fix="The adapter was trained on a different base model; give the base it was "
                                     "trained on.")
            if not info.dtype.is_floating_point:
                raise InputError(f"'{entry.weight_name}' has dtype {dtype_name(info.dtype)}, not a float dtype",
                                 where=base_label, fix="Give a float or a compress-quantized base.")
            seen = fan_in_fan_out.setdefault(entry.weight_name, (entry.fan_in_fan_out, k))
            if seen[0] != entry.fan_in_fan_out:
                raise InputError(f"adapters {adapters[seen[1]].name} and {adapter.name} disagree on fan_in_fan_out for "
                                 f"'{entry.module}'", fix="One of them was trained on a different model layout; merge "
                                 "adapters of the same base.")
            add(entry.weight_name, Contribution(k, "dora" if entry.is_dora else entry.kind, entry.module))
            if entry.bias is not None:
                bias = by_name.get(entry.bias_name)
                if bias is None or bias.shape != (entry.out_features,):
                    has = "no bias" if bias is None else f"a bias of shape {list(bias.shape)}"
                    raise InputError(f"adapter {adapter.name} has lora_bias for '{entry.module}' but the base layer "
                                     f"has {has}",
                                     where=base_label, fix="The adapter was trained on a different base model.")
                add(entry.bias_name, Contribution(k, "bias", entry.module))
        for name, tensor in adapter.replacements.items():
            info = by_name.get(name)
            if info is None:
                hint, fix = _missing_hint(base, name)
                raise InputError(f"adapter {adapter.name} carries a full tensor for '{name}' (modules_to_save or a "
                                 f"trained bias) but the base has no such tensor{hint}", where=base_label, fix=fix)
            if tuple(tensor.shape) != info.shape:
                hint = (" (the vocabulary was resized: resize the base's embeddings first)"
                        if len(info.shape) == 2 and tensor.shape[1:] == info.shape[1:] else "")
                raise InputError(f"adapter {adapter.name} carries '{name}' with shape {list(tensor.shape)} but the "
                                 f"base's has {list(info.shape)}{hint}", where=base_label,
                                 fix="The adapter was trained on a different base model; give the base it was "
                                     "trained on.")
            if not info.dtype.is_floating_point:
                raise InputError(f"'{name}' has dtype {dtype_name(info.dtype)}, not a float dtype", where=base_label,
                                 fix="Give a float or a compress-quantized base.")
            add(name, Contribution(k, "replace", name))
    ordered = {i.name: touched[i.name] for i in infos if i.name in touched}
    shared_dora = sum(1 for t in ordered.values()
                      if len(t.adapters) > 1 and any(c.kind == "dora" for c in t.contributions))
    if shared_dora:
        notes.append(f"{shared_dora} tensors combine a DoRA module with other adapters: DoRA is not additive, so it "
                     "enters the combination through the change it makes, m/||W+dW||*(W+dW) - W")
    if any(w != 1.0 for w in weights) and any(c.kind == "dora" for t in ordered.values() for c in t.contributions):
        notes.append("a weight other than 1 scales a DoRA adapter's realised change m/||W+dW||*(W+dW) - W")
    tied = [n for n, t in ordered.items() if any(adapters[c.adapter].modules[c.module].kind == "embedding"
                                                 for c in t.contributions if c.kind in ("embedding", "dora"))]
    if tied and (base.config or {}).get("tie_word_embeddings", False):
        notes.append(f"the base ties its output head to '{tied[0]}' (tie_word_embeddings): the merged embedding LoRA "
                     "changes the output head too, which the unmerged adapter does not (PEFT's merge_and_unload does "
                     "the same)")
    base_names = {_base_name(str(base.path)), _base_name((base.config or {}).get("_name_or_path"))} - {None}
    if distinct and distinct[0] not in base_names:
        recorded_name = next(a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path)
        notes.append(f"the adapters record base '{recorded_name}'; merged into {base.path.name} (every module and "
                     "shape matched)")
    return MergePlan(adapters=list(adapters), options=options, weights=weights, infos=infos, tensors=ordered,
                     notes=notes)


# --- execution ----------------------------------------------------------------------------------


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
    produced adds (or refreshes) its row in ``rows``; :meth:`report` collects them.
    """

    def __init__(self, base: CheckpointReader, plan: MergePlan, *, device: torch.device | None = None) -> None:
        self.base = base
        self.plan = plan
        self.path = base.path
        self.config = base.config
        self.device = device or torch.device("cpu")
        self.rows: dict[str, MergeRow] = {}
        # keep_last: the last merge_tensor() result is kept until the next merge (or forget()), so that a
        # consumer of get() that also needs the pieces (the GGUF Q4_1 fold) does not merge twice
        self.keep_last = False
        self._last: tuple[str, MergedTensor] | None = None

    def infos(self) -> list[TensorInfo]:
        return list(self.plan.infos)

    def forget(self) -> None:
        """Drop the kept merge result (see ``keep_last``)."""
        self._last = None

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
        (:func:`~compress.merge.adapter.qalora_group_delta`); None otherwise."""
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
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None  # free it before the next merge allocates
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
        result = MergedTensor(W=W, merged=merged, delta=D, row=row)
        if self.keep_last:
            self._last = (name, result)
        return result

    def report(self) -> MergeReport:
        rows = [self.rows[n] for n in self.plan.tensors if n in self.rows]
        return MergeReport(plan=self.plan.as_dict(), rows=rows, tensors_unchanged=len(self.plan.infos) - len(rows),
                           notes=list(self.plan.notes))


@dataclass
class MergeReport:
    plan: dict[str, Any]  # MergePlan.as_dict(): method, weights, adapters
    rows: list[MergeRow]
    tensors_unchanged: int = 0
    notes: list[str] = field(default_factory=list)
    bytes_written: int = 0

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


def write_merged(reader: MergedReader, out_dir: Path, *, shard_bytes: int,
                 progress: Progress | None = None) -> MergeReport:
    """Write the merged checkpoint into ``out_dir`` (an empty temporary folder): the weights in the
    base's dtypes (safetensors shards), config.json and the base's other non-weight files, and
    report.json / report.md. Returns the report."""
    from compress.pipeline.run import json_safe

    infos = reader.infos()
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in infos]
    writer = ShardedWriter(out_dir, specs, shard_bytes)
    try:
        for info in infos:
            writer.write(info.name, reader.get(info.name))
            if progress:
                progress(info.name, info.nbytes)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if reader.config:
        write_json(out_dir / "config.json", dict(reader.config))
    for name, source in reader.extra_files().items():
        (out_dir / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    report = reader.report()
    report.bytes_written = sum(s.nbytes for s in specs)
    write_json(out_dir / "report.json", json_safe(report.as_dict()))
    (out_dir / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    return report
