"""extract-lora: a PEFT LoRA adapter from a base and a fine-tuned checkpoint, by truncated SVD of
each weight delta dW = W_tuned - W_base (float32), streamed one tensor pair at a time.

Plan first (which tensors become LoRA factors, which are copied whole, which are skipped and why),
then execute; every skipped change is reported, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.peft_adapter import AdapterModule, AdapterSpec
from compress.lowrank.svd import RankRule, low_rank, pick_engine
from compress.metrics import frobenius_norm
from compress.pipeline.plan import EMBEDDING_PATTERN, HEAD_PATTERN, compile_regex, default_choice
from compress.pipeline.report import human_bytes

EMBEDDING_MODES = ("skip", "lora", "full")


@dataclass(frozen=True)
class ExtractOptions:
    """How to turn deltas into an adapter."""

    rule: RankRule
    engine: str = "auto"
    targets: str = "all-linear"  # or a regex searched in weight names
    embeddings: str = "skip"  # embeddings and lm_head: skip, lora, or full (modules_to_save)
    dtype: torch.dtype = torch.float32  # dtype of the saved factors
    seed: int = 0
    oversample: int = 16
    n_iter: int = 6

    def __post_init__(self) -> None:
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {self.embeddings!r}")
        pick_engine(self.engine, (1, 1), 1)  # validates the name


@dataclass(frozen=True)
class PairPlan:
    """What happens to one tensor present in both checkpoints."""

    name: str
    shape: tuple[int, ...]
    action: str  # lora | embedding-lora | full | bias | check (reported if changed) | skip
    reason: str


@dataclass
class ExtractPlan:
    entries: list[PairPlan] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def max_adapter_params(self, rule: RankRule) -> int:
        total = 0
        for e in self.entries:
            if e.action in ("lora", "embedding-lora"):
                r = rule.upper_bound((e.shape[0], e.shape[1]))
                total += r * (e.shape[0] + e.shape[1])
            elif e.action in ("full", "bias"):
                total += math.prod(e.shape)
        return total


def _is_embedding(name: str) -> bool:
    return bool(EMBEDDING_PATTERN.search(name))


def _is_head(name: str) -> bool:
    return bool(HEAD_PATTERN.search(name))


def plan_extraction(base: CheckpointReader, tuned: CheckpointReader, options: ExtractOptions) -> ExtractPlan:
    """Pair the tensors of the two checkpoints by name and decide each one's fate."""
    base_type = (base.config or {}).get("model_type")
    tuned_type = (tuned.config or {}).get("model_type")
    if base_type and tuned_type and base_type != tuned_type:
        raise InputError(f"base is a '{base_type}' model but tuned is a '{tuned_type}' model",
                         fix="Give the fine-tuned model and the exact base it was trained from.")
    base_infos = {i.name: i for i in base.infos()}
    tuned_infos = {i.name: i for i in tuned.infos()}
    common = [n for n in tuned_infos if n in base_infos]
    plan = ExtractPlan(only_in_base=sorted(set(base_infos) - set(tuned_infos)),
                       only_in_tuned=sorted(set(tuned_infos) - set(base_infos)))
    if not any(len(base_infos[n].shape) == 2 for n in common):
        raise InputError("the two checkpoints share no weight matrix by name (different architectures?)",
                         fix="Give the fine-tuned model and the exact base it was trained from.")
    target_re = None if options.targets == "all-linear" else compile_regex(options.targets, "--targets")
    target_modules = set()
    for name in common:
        b, t = base_infos[name], tuned_infos[name]
        if not (b.dtype.is_floating_point and t.dtype.is_floating_point):
            plan.entries.append(PairPlan(name, t.shape, "skip", "not a float tensor"))
            continue
        embedding_like = _is_embedding(name) or _is_head(name)
        if b.shape != t.shape:
            if embedding_like and len(b.shape) == 2 and b.shape[1] == t.shape[1]:
                if options.embeddings == "skip":
                    plan.entries.append(PairPlan(name, t.shape, "skip",
                                                 f"vocabulary size differs ({b.shape[0]} -> {t.shape[0]})"))
                    plan.notes.append(f"'{name}': the vocabulary changed ({b.shape[0]} -> {t.shape[0]} rows) and "
                                      "the embeddings were skipped; the adapter cannot carry new tokens. Resize the "
                                      "base's embeddings to the tuned vocabulary (resize_token_embeddings) and "
                                      "extract again with --embeddings full to keep them.")
                    continue
                raise InputError(f"'{name}' has {b.shape[0]} rows in the base but {t.shape[0]} in the tuned model "
                                 "(the vocabulary changed)",
                                 fix="Resize the base's embeddings to the tuned vocabulary (resize_token_embeddings), "
                                     "save it and use that as --base; or pass --embeddings skip.")
            raise InputError(f"tensor '{name}' has shape {list(b.shape)} in the base but {list(t.shape)} in the tuned "
                             "model", fix="Give the fine-tuned model and the exact base it was trained from.")
        if len(t.shape) == 2 and name.endswith(".weight"):
            if embedding_like:
                if options.embeddings == "skip":
                    action, reason = "check", "embedding or output head (--embeddings skip)"
                elif options.embeddings == "full":
                    action, reason = "full", "embedding or output head saved whole (--embeddings full)"
                else:
                    action = "embedding-lora" if _is_embedding(name) else "lora"
                    reason = "embedding or output head as LoRA (--embeddings lora)"
            else:
                chosen = default_choice(b)[0] if target_re is None else bool(target_re.search(name))
                action, reason = ("lora", "Linear weight") if chosen else ("check", "not a target module")
            if action in ("lora", "embedding-lora"):
                target_modules.add(name.removesuffix(".weight"))
            plan.entries.append(PairPlan(name, t.shape, action, reason))
        else:
            plan.entries.append(PairPlan(name, t.shape, "check", "not a weight matrix"))
    # Bias deltas of target modules travel with the adapter (lora_bias); others are only checked.
    for i, e in enumerate(plan.entries):
        if e.action == "check" and e.name.endswith(".bias") and e.name.removesuffix(".bias") in target_modules:
            plan.entries[i] = PairPlan(e.name, e.shape, "bias", "bias of a target module (lora_bias)")
    if plan.only_in_base or plan.only_in_tuned:
        plan.notes.append(f"{len(plan.only_in_base)} tensors only in the base and {len(plan.only_in_tuned)} only in "
                          "the tuned model were skipped" + (f" (e.g. '{(plan.only_in_base + plan.only_in_tuned)[0]}')"))
    return plan


@dataclass
class ModuleRow:
    module: str
    shape: tuple[int, ...]
    kind: str
    rank: int
    retained_energy: float
    rel_error: float  # measured ||dW - B A||_F / ||dW||_F
    eckart_young: float  # sqrt(1 - retained energy) from the computed singular values
    delta_rel: float  # ||dW||_F / ||W_base||_F
    params: int
    engine: str

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "shape": list(self.shape), "kind": self.kind, "rank": self.rank,
                "retained_energy": self.retained_energy, "rel_error": self.rel_error,
                "eckart_young_rel_error": self.eckart_young, "delta_rel_to_base": self.delta_rel,
                "params": self.params, "engine": self.engine}


@dataclass
class ExtractReport:
    rule: dict[str, Any]
    rows: list[ModuleRow] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # changed but not in the adapter
    adapter_bytes: int = 0
    delta_bytes: int = 0  # the dense deltas of the extracted modules, float32
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        lora = [r for r in self.rows if r.kind in ("lora", "embedding-lora")]
        worst = min(lora, key=lambda r: (r.retained_energy, r.module), default=None)
        return {
            "modules_extracted": len(lora),
            "modules_saved_whole": sum(r.kind == "full" for r in self.rows),
            "bias_deltas": sum(r.kind == "bias" for r in self.rows),
            "modules_unchanged": len(self.unchanged),
            "changes_dropped": len(self.dropped),
            "adapter_bytes": self.adapter_bytes,
            "delta_bytes": self.delta_bytes,
            "adapter_to_delta": self.adapter_bytes / self.delta_bytes if self.delta_bytes else 0.0,
            "mean_retained_energy": sum(r.retained_energy for r in lora) / len(lora) if lora else 1.0,
            "worst_retained_energy": worst.retained_energy if worst else 1.0,
            "worst_module": worst.module if worst else None,
            "max_rel_error": max((r.rel_error for r in lora), default=0.0),
            "ranks": sorted({r.rank for r in lora}),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "totals": self.totals(), "notes": self.notes,
                "modules": [r.as_dict() for r in sorted(self.rows, key=lambda r: (r.retained_energy, r.module))],
                "unchanged": self.unchanged, "dropped": self.dropped}

    def to_markdown(self) -> str:
        t = self.totals()
        lines = [
            "# LoRA extraction report", "", f"Rank rule: `{self.rule}`", "",
            "| total | value |", "|---|---|",
            f"| modules extracted / saved whole / bias deltas | {t['modules_extracted']} / "
            f"{t['modules_saved_whole']} / {t['bias_deltas']} |",
            f"| modules unchanged (left out) | {t['modules_unchanged']} |",
            f"| changes dropped (not representable) | {t['changes_dropped']} |",
            f"| adapter size / dense delta size | {human_bytes(t['adapter_bytes'])} / {human_bytes(t['delta_bytes'])} "
            f"({t['adapter_to_delta']:.3f}) |",
            f"| retained energy: mean / worst | {t['mean_retained_energy']:.4f} / {t['worst_retained_energy']:.4f} "
            f"(`{t['worst_module']}`) |",
            f"| ranks used | {t['ranks']} |", "",
        ]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        if self.dropped:
            lines += ["## Changes not in the adapter", "", "| tensor | reason | ‖ΔW‖/‖W‖ |", "|---|---|---|"]
            lines += [f"| `{d['name']}` | {d['reason']} | {d['delta_rel_to_base']:.3g} |" for d in self.dropped]
            lines.append("")
        lines += ["## Modules (least retained energy first)", "",
                  "| module | shape | kind | rank | retained energy | rel. error | Eckart-Young | ‖ΔW‖/‖W‖ | params |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: (r.retained_energy, r.module)):
            lines.append(f"| `{r.module}` | {list(r.shape)} | {r.kind} | {r.rank} | {r.retained_energy:.4f} | "
                         f"{r.rel_error:.4f} | {r.eckart_young:.4f} | {r.delta_rel:.3g} | {r.params:,} |")
        return "\n".join(lines) + "\n"

    def rich_tables(self, limit: int = 15) -> list[Any]:
        from rich.table import Table

        t = self.totals()
        table = Table(title="extracted modules, least retained energy first"
                      + (f" (top {limit} of {len(self.rows)})" if len(self.rows) > limit else ""))
        table.add_column("module", overflow="fold", min_width=24)
        for col in ("kind", "rank", "retained", "rel. error", "‖ΔW‖/‖W‖"):
            table.add_column(col, justify="right", no_wrap=True)
        for r in sorted(self.rows, key=lambda r: (r.retained_energy, r.module))[:limit]:
            table.add_row(r.module, r.kind, str(r.rank), f"{r.retained_energy:.4f}", f"{r.rel_error:.4f}",
                          f"{r.delta_rel:.3g}")
        summary = Table(title="totals", show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        summary.add_row("modules extracted / whole / bias", f"{t['modules_extracted']} / {t['modules_saved_whole']}"
                        f" / {t['bias_deltas']}")
        summary.add_row("unchanged (left out)", str(t["modules_unchanged"]))
        summary.add_row("changes dropped", str(t["changes_dropped"]))
        summary.add_row("adapter / dense delta", f"{human_bytes(t['adapter_bytes'])} / {human_bytes(t['delta_bytes'])}")
        summary.add_row("retained energy mean / worst", f"{t['mean_retained_energy']:.4f} / "
                        f"{t['worst_retained_energy']:.4f}")
        return [table, summary]


Progress = Callable[[str, int], None]


def execute_extraction(plan: ExtractPlan, base: CheckpointReader, tuned: CheckpointReader, options: ExtractOptions,
                       *, device: torch.device, base_name: str | None,
                       progress: Progress | None = None) -> tuple[AdapterSpec, ExtractReport]:
    """Compute every delta's factors. Returns the adapter (small: rank-r factors) and the report."""
    rule = options.rule
    report = ExtractReport(rule={k: v for k, v in vars(rule).items() if v is not None} | {"svd": options.engine},
                           notes=list(plan.notes))
    modules: dict[str, AdapterModule] = {}
    biases: dict[str, tuple[torch.Tensor, float]] = {}  # module -> (bias delta, ||db|| / ||b||)
    capped = 0
    for entry in plan.entries:
        nbytes = math.prod(entry.shape) * 4
        if entry.action == "skip":
            if progress:
                progress(entry.name, nbytes)
            continue
        W_base = base.get(entry.name).to(device)
        W_tuned = tuned.get(entry.name).to(device)
        dW = W_tuned.float() - W_base.float()
        # A NaN or inf anywhere makes the float64 sum of squares non-finite (finite float32 squares cannot
        # overflow it), so the norm doubles as the finiteness check without another pass.
        delta_norm = frobenius_norm(dW)
        if not math.isfinite(delta_norm):
            raise InputError(f"the delta of '{entry.name}' has non-finite values (NaN or inf)",
                             fix="One of the checkpoints is damaged; check both with `compress inspect`.")
        base_norm = frobenius_norm(W_base)
        delta_rel = delta_norm / base_norm if base_norm > 0 else (0.0 if delta_norm == 0 else math.inf)
        module = entry.name.rsplit(".", 1)[0]
        if delta_norm == 0:
            report.unchanged.append(entry.name)
        elif entry.action == "check":
            report.dropped.append({"name": entry.name, "reason": entry.reason, "delta_rel_to_base": delta_rel})
        elif entry.action == "bias":
            biases[module] = (dW.to("cpu", options.dtype), delta_rel)
            report.rows.append(ModuleRow(entry.name, entry.shape, "bias", 0, 1.0, 0.0, 0.0, delta_rel,
                                         dW.numel(), "-"))
        elif entry.action == "full":
            modules[module] = AdapterModule(module, "full", weight=W_tuned.to("cpu"))
            report.rows.append(ModuleRow(module, entry.shape, "full", 0, 1.0, 0.0, 0.0, delta_rel,
                                         W_tuned.numel(), "-"))
        else:
            embedding = entry.action == "embedding-lora"
            target = dW.T if embedding else dW  # PEFT's embedding delta is (B @ A)^T
            if rule.rank is not None and rule.rank > min(target.shape):
                capped += 1
            lr = low_rank(target, rule, engine=options.engine, oversample=options.oversample,
                          n_iter=options.n_iter, seed=options.seed, total_energy=delta_norm**2)
            residual = frobenius_norm(torch.addmm(target, lr.B, lr.A, alpha=-1))
            kind = "embedding" if embedding else "linear"
            modules[module] = AdapterModule(module, kind, A=lr.A.to("cpu", options.dtype),
                                            B=lr.B.to("cpu", options.dtype))
            report.rows.append(ModuleRow(module, entry.shape, "embedding-lora" if embedding else "lora", lr.rank,
                                         lr.retained_energy, residual / delta_norm, lr.eckart_young_rel_error,
                                         delta_rel, lr.A.numel() + lr.B.numel(), lr.engine))
            report.delta_bytes += dW.numel() * 4
        del W_base, W_tuned, dW
        if progress:
            progress(entry.name, nbytes)
    zero_rank = [r for r in report.rows if r.kind in ("lora", "embedding-lora") and r.rank == 0]
    for row in zero_rank:  # nothing to write: no singular value qualified under the rule
        modules.pop(row.module, None)
        report.dropped.append({"name": row.module + ".weight", "reason": "rank 0 under the rank rule",
                               "delta_rel_to_base": row.delta_rel})
    if zero_rank:
        report.notes.append(f"{len(zero_rank)} modules kept rank 0 under the rule (no singular value qualified) and "
                            "were left out of the adapter")
        report.rows = [r for r in report.rows if r not in zero_rank]
    # Biases travel on their module's LoRA (lora_B.bias); without one, PEFT has nowhere to put them.
    for module, (bias, delta_rel) in biases.items():
        if module in modules and modules[module].kind == "linear":
            modules[module].bias = bias
            continue
        weight_row = next((d for d in report.dropped if d["name"] == module + ".weight"), None)
        rank_zero = weight_row is not None and weight_row["reason"].startswith("rank 0")
        reason = "its weight kept rank 0 under the rank rule" if rank_zero else "bias changed but its weight did not"
        report.dropped.append({"name": module + ".bias", "reason": reason, "delta_rel_to_base": delta_rel})
        report.rows = [r for r in report.rows if r.module != module + ".bias"]
    if capped:
        report.notes.append(f"--rank {rule.rank} exceeds the smaller side of {capped} matrices: their rank was capped "
                            "at min(out, in), which represents the delta exactly")
    all_names = sorted({n.rsplit(".", 1)[0] for n in (i.name for i in base.infos())})
    architectures = (base.config or {}).get("architectures") or []
    task = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
    spec = AdapterSpec(modules=[modules[m] for m in sorted(modules)], base_model_name_or_path=base_name,
                       task_type=task, all_module_names=all_names)
    report.adapter_bytes = sum(t.numel() * t.element_size() for t in spec.state_dict().values())
    return spec, report

