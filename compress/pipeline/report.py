"""The accuracy report of a quantize run: per tensor and in total, as JSON, Markdown and a rich table.

Everything in report.json is a function of the inputs and options (no times, no paths), so two
runs on the same device give identical reports; run-specific details go to the provenance file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from compress.metrics import ErrorMetrics
from compress.units import human_bytes, parse_size  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    bits_per_weight: float
    metrics: ErrorMetrics
    note: str = ""
    # With an algorithm other than rtn: RTN's error on the same tensor, and the algorithm whose result was
    # written ("rtn" where RTN's grid was better on the tensor).
    rtn: ErrorMetrics | None = None
    algorithm: str = ""
    # With calibration: ||X W^T - X W'^T|| / ||X W^T|| on the calibration inputs, of what was written and of RTN.
    output_error: float | None = None
    rtn_output_error: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.rtn is not None:
            extra = {"algorithm": self.algorithm, "rtn_rel_fro": self.rtn.rel_fro, "rtn_sqnr_db": self.rtn.sqnr_db}
        if self.output_error is not None:
            extra.update(output_error=self.output_error, rtn_output_error=self.rtn_output_error)
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bits_per_weight": self.bits_per_weight, **self.metrics.as_dict(), **extra,
                **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class KeptRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "reason": self.reason}


@dataclass
class QuantizeReport:
    method: str
    parameters: dict[str, Any]
    format: str
    quantized: list[TensorRow] = field(default_factory=list)
    kept: list[KeptRow] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, row: TensorRow | KeptRow) -> None:
        """Collect one row from the executor (plan order)."""
        if isinstance(row, TensorRow):
            self.quantized.append(row)
        elif isinstance(row, KeptRow):
            self.kept.append(row)
        else:
            raise TypeError(f"not a quantization report row: {row!r}")

    # -- totals ---------------------------------------------------------------------------------
    @property
    def params_quantized(self) -> int:
        return sum(r.numel for r in self.quantized)

    @property
    def params_kept(self) -> int:
        return sum(math.prod(k.shape) for k in self.kept)

    @property
    def bits_per_quantized_weight(self) -> float:
        n = self.params_quantized
        return sum(r.bits_per_weight * r.numel for r in self.quantized) / n if n else 0.0

    def worst(self) -> list[TensorRow]:
        return sorted(self.quantized, key=lambda r: (-r.metrics.rel_fro, r.name))

    def totals(self) -> dict[str, Any]:
        n = self.params_quantized
        worst = self.worst()
        # Parameter-weighted mean of squared relative errors: the relative error of the whole model's
        # quantized weights if every tensor had equal norm per parameter.
        mean_rel = math.sqrt(sum(r.metrics.rel_fro**2 * r.numel for r in self.quantized) / n) if n else 0.0
        kept_by_reason: dict[str, int] = {}
        for k in self.kept:
            kept_by_reason[k.reason] = kept_by_reason.get(k.reason, 0) + 1
        total_params = n + self.params_kept
        return {
            "tensors_quantized": len(self.quantized),
            "tensors_kept": len(self.kept),
            "params_quantized": n,
            "params_kept": self.params_kept,
            "bits_per_quantized_weight": self.bits_per_quantized_weight,
            "bits_per_param_overall": 8 * self.bytes_after / total_params if total_params else 0.0,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression_ratio": self.bytes_before / self.bytes_after if self.bytes_after else 0.0,
            "rms_rel_fro": mean_rel,
            "worst_rel_fro": worst[0].metrics.rel_fro if worst else 0.0,
            "worst_tensor": worst[0].name if worst else None,
            "min_sqnr_db": min((r.metrics.sqnr_db for r in self.quantized), default=0.0),
            "min_cosine": min((r.metrics.cosine for r in self.quantized), default=1.0),
            "kept_by_reason": kept_by_reason,
            **self.algorithm_totals(),
        }

    def algorithm_totals(self) -> dict[str, Any]:
        """RTN's error beside the algorithm's, when one other than rtn ran (empty otherwise)."""
        compared = [r for r in self.quantized if r.rtn is not None]
        if not compared:
            return {}
        n = sum(r.numel for r in compared)
        out = {"rtn_rms_rel_fro": math.sqrt(sum(r.rtn.rel_fro**2 * r.numel for r in compared) / n),  # type: ignore[union-attr]
               "tensors_kept_rtn": sum(r.algorithm == "rtn" for r in compared),
               "tensors_by_algorithm": {a: sum(r.algorithm == a for r in compared)
                                        for a in sorted({r.algorithm for r in compared})}}
        calibrated = [r for r in compared if r.output_error is not None]
        if calibrated:
            m = sum(r.numel for r in calibrated)
            out["rms_output_error"] = math.sqrt(sum(r.output_error**2 * r.numel for r in calibrated) / m)  # type: ignore[operator]
            out["rtn_rms_output_error"] = math.sqrt(sum(r.rtn_output_error**2 * r.numel  # type: ignore[operator]
                                                        for r in calibrated) / m)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "parameters": self.parameters,
            "format": self.format,
            "totals": self.totals(),
            "notes": self.notes,
            "quantized": [r.as_dict() for r in self.worst()],
            "kept": [k.as_dict() for k in self.kept],
        }

    # -- rendering ------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        t = self.totals()
        lines = [
            f"# Quantization report: {self.method} ({self.format})",
            "",
            f"Parameters: `{self.parameters}`",
            "",
            "| total | value |",
            "|---|---|",
            f"| tensors quantized / kept | {t['tensors_quantized']} / {t['tensors_kept']} |",
            f"| parameters quantized / kept | {t['params_quantized']:,} / {t['params_kept']:,} |",
            f"| bits per quantized weight | {t['bits_per_quantized_weight']:.3f} |",
            f"| bits per parameter, whole checkpoint | {t['bits_per_param_overall']:.3f} |",
            f"| size on disk before / after (weight files) | {human_bytes(t['bytes_before'])} / "
            f"{human_bytes(t['bytes_after'])} ({size_ratio(t['compression_ratio'])}) |",
            f"| RMS relative Frobenius error | {t['rms_rel_fro']:.4f} |",
            f"| worst relative Frobenius error | {t['worst_rel_fro']:.4f} (`{t['worst_tensor']}`) |",
            f"| lowest SQNR / cosine | {t['min_sqnr_db']:.2f} dB / {t['min_cosine']:.5f} |",
            *self._algorithm_lines(t),
            "",
        ]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        compared = "rtn_rms_rel_fro" in t
        calibrated = "rms_output_error" in t
        lines += ["## Quantized tensors (worst first)", "",
                  "| tensor | shape | bits/w | rel. Frobenius | SQNR dB | max abs | cosine |"
                  + (" RTN rel. Frobenius | written |" if compared else "")
                  + (" output error | RTN output error |" if calibrated else ""),
                  "|---|---|---|---|---|---|---|" + "---|---|" * (compared + calibrated)]
        for r in self.worst():
            m = r.metrics
            lines.append(f"| `{r.name}` | {list(r.shape)} | {r.bits_per_weight:.3f} | {m.rel_fro:.4f} | "
                         f"{m.sqnr_db:.2f} | {m.max_abs:.4g} | {m.cosine:.5f} |"
                         + (f" {r.rtn.rel_fro:.4f} | {r.algorithm} |" if r.rtn is not None else "")
                         + (f" {r.output_error:.4f} | {r.rtn_output_error:.4f} |" if r.output_error is not None
                            else (" | |" if calibrated else "")))
        lines += ["", "## Kept tensors", "", "| reason | count |", "|---|---|"]
        for reason, count in t["kept_by_reason"].items():
            lines.append(f"| {reason} | {count} |")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _algorithm_lines(t: dict[str, Any]) -> list[str]:
        if "rtn_rms_rel_fro" not in t:
            return []
        lines = [f"| RMS relative Frobenius error of RTN on the same tensors | {t['rtn_rms_rel_fro']:.4f} |",
                 f"| tensors written by each algorithm | {t['tensors_by_algorithm']} |"]
        if "rms_output_error" in t:
            lines.append(f"| RMS relative output error on the calibration inputs, written / RTN | "
                         f"{t['rms_output_error']:.4f} / {t['rtn_rms_output_error']:.4f} |")
        return lines

    def rich_tables(self, limit: int = 15) -> list[Any]:
        from rich.table import Table

        t = self.totals()
        rows = Table(title=f"{self.method} → {self.format}: quantized tensors, worst first"
                     + (f" (top {limit} of {len(self.quantized)})" if len(self.quantized) > limit else ""))
        for col in ("tensor", "shape", "bits/w", "rel. Frob.", "SQNR dB", "max abs", "cosine"):
            if col == "tensor":  # names must stay readable: fold them rather than cut them off
                rows.add_column(col, overflow="fold", min_width=24)
            else:
                rows.add_column(col, justify="right", no_wrap=True)
        for r in self.worst()[:limit]:
            m = r.metrics
            rows.add_row(r.name, "×".join(map(str, r.shape)), f"{r.bits_per_weight:.3f}", f"{m.rel_fro:.4f}",
                         f"{m.sqnr_db:.2f}", f"{m.max_abs:.3g}", f"{m.cosine:.5f}")
        summary = Table(title="totals", show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        summary.add_row("tensors quantized / kept", f"{t['tensors_quantized']} / {t['tensors_kept']}")
        summary.add_row("parameters quantized / kept", f"{t['params_quantized']:,} / {t['params_kept']:,}")
        summary.add_row("bits per quantized weight", f"{t['bits_per_quantized_weight']:.3f}")
        ratio = t["compression_ratio"]
        summary.add_row("size on disk before → after",
                        f"{human_bytes(t['bytes_before'])} → {human_bytes(t['bytes_after'])} ({size_ratio(ratio)})")
        summary.add_row("RMS / worst rel. Frobenius", f"{t['rms_rel_fro']:.4f} / {t['worst_rel_fro']:.4f}")
        if "rtn_rms_rel_fro" in t:
            summary.add_row("RMS rel. Frobenius of RTN", f"{t['rtn_rms_rel_fro']:.4f}")
            summary.add_row("tensors written by", ", ".join(f"{k} {v}" for k, v in t["tensors_by_algorithm"].items()))
        if "rms_output_error" in t:
            summary.add_row("RMS output error, written / RTN",
                            f"{t['rms_output_error']:.4f} / {t['rtn_rms_output_error']:.4f}")
        for reason, count in t["kept_by_reason"].items():
            summary.add_row(f"kept: {reason}", str(count))
        return [rows, summary]


def size_ratio(ratio: float) -> str:
    """'3.09x smaller', or for an output larger than its input (an already quantized input) '1.07x larger'."""
    if ratio <= 0:
        return "no output"
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger than the input"


