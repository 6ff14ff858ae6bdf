"""The report of an extract-lora run: one typed row per extracted module, and what was left out and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.pipeline.report import human_bytes


@dataclass(frozen=True)
class Unchanged:
    """Row: a tensor whose delta is exactly zero (left out of the adapter)."""

    name: str


@dataclass(frozen=True)
class Dropped:
    """Row: a tensor that changed but is not in the adapter, and why."""

    name: str
    reason: str
    delta_rel: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "delta_rel_to_base": self.delta_rel}


@dataclass(frozen=True)
class ModuleRow:
    """One extracted module. With calibration the SVD runs in the output space (activation-aware): then
    ``retained_energy`` and ``eckart_young`` are of dW L (the output energy), and ``output_error`` is the measured
    relative error of the module's output on the calibration inputs; ``rel_error`` is always the weight error."""

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
    output_error: float | None = None  # sqrt(tr(E S E^T) / tr(dW S dW^T)), E = dW - B A, with calibration
    # for a global budget (not serialised): the singular values, ||dW (L)||^2 and the error curves per rank
    spectrum: Any = None
    total_energy: float = 0.0
    weight_curve: Any = None
    output_curve: Any = None

    def truncated(self, rank: int) -> ModuleRow:
        """This row with only the first ``rank`` ranks kept (the factors truncated alike)."""
        from dataclasses import replace

        kept = float((self.spectrum[:rank].double() ** 2).sum())
        energy = min(kept / self.total_energy, 1.0) if self.total_energy > 0 else 1.0
        return replace(self, rank=rank, retained_energy=energy, rel_error=self.weight_curve[rank - 1],
                       eckart_young=max(1.0 - energy, 0.0) ** 0.5, params=self.params * rank // max(self.rank, 1),
                       output_error=None if self.output_curve is None else self.output_curve[rank - 1])

    def as_dict(self) -> dict[str, Any]:
        out = {"module": self.module, "shape": list(self.shape), "kind": self.kind, "rank": self.rank,
               "retained_energy": self.retained_energy, "rel_error": self.rel_error,
               "eckart_young_rel_error": self.eckart_young, "delta_rel_to_base": self.delta_rel,
               "params": self.params, "engine": self.engine}
        if self.output_error is not None:
            out["output_error"] = self.output_error
        return out


@dataclass
class ExtractReport:
    rule: dict[str, Any]
    rows: list[ModuleRow] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)  # changed but not in the adapter
    adapter_bytes: int = 0
    delta_bytes: int = 0  # the dense deltas of the extracted modules, float32
    notes: list[str] = field(default_factory=list)
    refinement: dict[str, Any] | None = None  # extract-lora --refine-steps: lowrank.refine.RefineResult.as_dict()

    def add(self, row: ModuleRow | Unchanged | Dropped) -> None:
        if isinstance(row, ModuleRow):
            self.rows.append(row)
        elif isinstance(row, Unchanged):
            self.unchanged.append(row.name)
        elif isinstance(row, Dropped):
            self.dropped.append(row)
        else:
            raise TypeError(f"not an extraction report row: {row!r}")

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
            "mean_rank": sum(r.rank for r in lora) / len(lora) if lora else 0.0,
            **({"rms_output_error": (sum(r.output_error ** 2 for r in outs) / len(outs)) ** 0.5}
               if (outs := [r for r in lora if r.output_error is not None]) else {}),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "totals": self.totals(), "notes": self.notes,
                **({"refinement": self.refinement} if self.refinement is not None else {}),
                "modules": [r.as_dict() for r in sorted(self.rows, key=lambda r: (r.retained_energy, r.module))],
                "unchanged": self.unchanged, "dropped": [d.as_dict() for d in self.dropped]}

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
            f"| ranks used (mean) | {t['ranks']} ({t['mean_rank']:.1f}) |",
            *([f"| output error on the calibration inputs, rms over modules | {t['rms_output_error']:.4f} |"]
              if "rms_output_error" in t else []),
            *([f"| refinement: held-out KL before -> after ({r['steps']} steps) | {r['heldout_kl_before']:.4g} -> "
               f"{r['heldout_kl_after']:.4g} ({'kept' if r['kept'] else 'not lower: SVD factors kept'}) |"]
              if (r := self.refinement) is not None else []), "",
        ]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        if self.dropped:
            lines += ["## Changes not in the adapter", "", "| tensor | reason | ‖ΔW‖/‖W‖ |", "|---|---|---|"]
            lines += [f"| `{d.name}` | {d.reason} | {d.delta_rel:.3g} |" for d in self.dropped]
            lines.append("")
        lines += ["## Modules (least retained energy first)", "",
                  "| module | shape | kind | rank | retained energy | weight error | output error | Eckart-Young | "
                  "‖ΔW‖/‖W‖ | params |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: (r.retained_energy, r.module)):
            out = f"{r.output_error:.4f}" if r.output_error is not None else "—"
            lines.append(f"| `{r.module}` | {list(r.shape)} | {r.kind} | {r.rank} | {r.retained_energy:.4f} | "
                         f"{r.rel_error:.4f} | {out} | {r.eckart_young:.4f} | {r.delta_rel:.3g} | {r.params:,} |")
        return "\n".join(lines) + "\n"

    def rich_tables(self, limit: int = 15) -> list[Any]:
        from rich.table import Table

        t = self.totals()
        table = Table(title="extracted modules, least retained energy first"
                      + (f" (top {limit} of {len(self.rows)})" if len(self.rows) > limit else ""))
        table.add_column("module", overflow="fold", min_width=24)
        calibrated = any(r.output_error is not None for r in self.rows)
        for col in ("kind", "rank", "retained", "weight err.", *(["output err."] if calibrated else []), "‖ΔW‖/‖W‖"):
            table.add_column(col, justify="right", no_wrap=True)
        for r in sorted(self.rows, key=lambda r: (r.retained_energy, r.module))[:limit]:
            out = [f"{r.output_error:.4f}" if r.output_error is not None else "—"] if calibrated else []
            table.add_row(r.module, r.kind, str(r.rank), f"{r.retained_energy:.4f}", f"{r.rel_error:.4f}", *out,
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
