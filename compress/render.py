"""What the command line shows: rich tables, notes, JSON on stdout, and the progress bar. Display only: every
function takes what a pipeline function returned and prints it to the console it is given."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from compress.catalog import FORMATS, METHODS
from compress.units import human_bytes


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def notes(console: Console, items: list[str]) -> None:
    for note in items:
        console.print(f"[yellow]note:[/] {note}")


class RichProgress:
    """A progress bar on stderr: bytes done and tasks finished, the current tensor's name."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TextColumn("{task.fields[tasks]} tasks"), TimeRemainingColumn(), console=console,
                            transient=True)
        self.task: Any = None
        self.total_tasks = 0
        self.done_tasks = 0

    def start(self, label: str, total_bytes: int, total_tasks: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.total_tasks, self.done_tasks = total_tasks, 0
        self.task = self.bar.add_task(label, total=total_bytes, tasks=f"0/{total_tasks}")

    def stage(self, text: str) -> None:
        """Say what the run is doing between tasks (a calibration block's forward passes)."""
        if self.task is not None:
            self.bar.update(self.task, description=text)

    def advance(self, name: str, nbytes: int) -> None:
        self.done_tasks += 1
        self.bar.update(self.task, advance=nbytes, description=name[-50:],
                        tasks=f"{min(self.done_tasks, self.total_tasks)}/{self.total_tasks}")


class LineProgress:
    """Progress for a stderr that is not a terminal (a pipe, a CI log): plain lines instead of a bar. What the run
    is doing (a stage, or how many tasks are done) at most once every ``interval`` seconds, and one line when each
    phase ends: its tasks, bytes and seconds."""

    def __init__(self, console: Console, interval: float = 10.0) -> None:
        import time

        self.console, self.interval, self.clock = console, interval, time.monotonic
        self.label: str | None = None
        self.total_bytes = self.total_tasks = self.done_bytes = self.done_tasks = 0
        self.started = self.last = 0.0

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def _due(self) -> bool:
        now = self.clock()
        if now - self.last < self.interval:
            return False
        self.last = now
        return True

    def start(self, label: str, total_bytes: int, total_tasks: int) -> None:
        self.finish()
        self.label, self.total_bytes, self.total_tasks = label, total_bytes, total_tasks
        self.done_bytes = self.done_tasks = 0
        self.started = self.last = self.clock()

    def stage(self, text: str) -> None:
        if self.label is not None and self._due():
            self._line(f"{self.label}: {text}")

    def advance(self, name: str, nbytes: int) -> None:
        self.done_tasks += 1
        self.done_bytes += nbytes
        if self._due():
            share = self.done_bytes / self.total_bytes if self.total_bytes else 0.0
            self._line(f"{self.label}: {min(self.done_tasks, self.total_tasks)}/{self.total_tasks} tasks, "
                       f"{human_bytes(self.done_bytes)} of {human_bytes(self.total_bytes)} ({share:.0%})")

    def finish(self) -> None:
        """The line that ends the current phase (nothing when none is running)."""
        if self.label is None:
            return
        self._line(f"{self.label}: done, {min(self.done_tasks, self.total_tasks)}/{self.total_tasks} tasks, "
                   f"{human_bytes(self.done_bytes)} in {self.clock() - self.started:.1f} s")
        self.label = None


PROGRESS_MODES = ("auto", "bar", "lines", "off")


@contextlib.contextmanager
def progress(console: Console, enabled: bool) -> Iterator[RichProgress | LineProgress | None]:
    """Progress while the block runs, as COMPRESS_PROGRESS says: ``auto`` (the default) a bar on a terminal and
    lines (:class:`LineProgress`) elsewhere, ``bar``, ``lines`` or ``off``; None when ``enabled`` is false."""
    import os

    mode = os.environ.get("COMPRESS_PROGRESS", "auto").lower()
    if mode not in PROGRESS_MODES:
        mode = "auto"
    if mode == "auto":
        mode = "bar" if console.is_terminal else "lines"
    if not enabled or mode == "off":
        yield None
        return
    if mode == "lines":
        lines = LineProgress(console)
        ok = False
        try:
            yield lines
            ok = True
        finally:
            if ok:  # a run that failed says so itself; its last phase did not finish
                lines.finish()
        return
    bar = RichProgress(console)
    with bar.bar:
        yield bar


def result(console: Console, out: Path, report: Any, size: int, *, as_json: bool, quiet: bool,
           report_json: Path | None = None) -> None:
    """The end of a run: report.json on stdout with --json, else the tables and notes."""
    report_json = report_json or out / "report.json"
    if as_json:
        echo_json(json.loads(report_json.read_text()))
    elif not quiet:
        for table in report.rich_tables():
            console.print(table)
        notes(console, report.notes)
        console.print(f"wrote {out} ({human_bytes(size)}); report: {report_json.with_suffix('.md')}")


def _plan_summary(console: Console, title: str, groups: dict[tuple[str, str], list[tuple[str, int, int]]],
                  size_column: str = "bytes → after") -> None:
    """One row per (action, reason): how many tensors, of which shapes, bytes before and after."""
    table = Table(title=title)
    for col in ("action", "reason", "tensors", "shapes", size_column):
        table.add_column(col, overflow="fold")
    for (action, reason), items in groups.items():
        shapes: dict[str, int] = {}
        for shape, _, _ in items:
            shapes[shape] = shapes.get(shape, 0) + 1
        listed = ", ".join(f"{s} ×{n}" for s, n in list(shapes.items())[:4])
        if len(shapes) > 4:
            listed += f", and {len(shapes) - 4} more"
        before, after = sum(b for _, b, _ in items), sum(a for _, _, a in items)
        size = (f"{human_bytes(before)} → {human_bytes(after)}" if size_column == "bytes → after"
                else human_bytes(before))
        table.add_row(action, reason, str(len(items)), listed, size)
    console.print(table)


def quantize_plan(console: Console, plan: Any, as_json: bool, verbose: bool = False) -> None:
    from compress.formats.base import dtype_name
    from compress.quant import config_to_dict, describe_config

    data = {
        "method": plan.method, "parameters": config_to_dict(plan.config), "format": plan.format.name,
        "algorithm": plan.algorithm, "bytes_before": plan.input_bytes, "bytes_after": plan.output_bytes,
        "tensors": [{"name": e.info.name, "shape": list(e.info.shape), "dtype": dtype_name(e.info.dtype),
                     "action": "quantize" if e.quantize else "keep", "reason": e.reason,
                     "bytes_before": e.info.nbytes, "bytes_after": e.output_bytes} for e in plan.entries],
    }
    if as_json:
        echo_json(data)
        return
    how = "" if plan.algorithm == "rtn" else f", {plan.algorithm}"
    title = f"plan: {describe_config(plan.config)}{how} → {plan.format.name} (dry run, nothing written)"
    if verbose:
        table = Table(title=title)
        table.add_column("tensor", overflow="fold", min_width=24)
        for col in ("shape", "dtype", "action", "reason", "bytes → after"):
            table.add_column(col)
        for e in plan.entries:
            table.add_row(e.info.name, "×".join(map(str, e.info.shape)), dtype_name(e.info.dtype),
                          "quantize" if e.quantize else "keep", e.reason,
                          f"{human_bytes(e.info.nbytes)} → {human_bytes(e.output_bytes)}")
        console.print(table)
    else:
        groups: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
        for e in plan.entries:
            key = ("quantize" if e.quantize else "keep", e.reason)
            groups.setdefault(key, []).append(("×".join(map(str, e.info.shape)), e.info.nbytes, e.output_bytes))
        _plan_summary(console, title, groups)
    console.print(f"{len(plan.quantized)} tensors to quantize, {len(plan.kept)} kept; projected size "
                  f"{human_bytes(plan.input_bytes)} → {human_bytes(plan.output_bytes)}"
                  + ("" if verbose else " (every tensor: --verbose)"))


def gguf_plan(console: Console, plan: Any, infos: list[Any], as_json: bool) -> None:
    by_name = {i.name: i for i in infos}
    rows = [{"name": t.source, "gguf_name": t.name, "shape": list(t.shape), "type": t.qtype.upper(),
             "bytes_before": by_name[t.source].nbytes, "bytes_after": t.nbytes} for t in plan.tensors]
    before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
    if as_json:
        echo_json({"method": plan.method, "format": "gguf", "bytes_before": before, "bytes_after": after,
                   "notes": plan.notes, "tensors": rows})
        return
    table = Table(title=f"plan: {plan.method} → gguf (dry run, nothing written)")
    table.add_column("tensor", overflow="fold", min_width=24)
    for col in ("gguf name", "shape", "type", "bytes → after"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["gguf_name"], "×".join(map(str, r["shape"])), r["type"],
                      f"{human_bytes(r['bytes_before'])} → {human_bytes(r['bytes_after'])}")
    console.print(table)
    notes(console, plan.notes)
    console.print(f"{len(rows)} tensors; projected size {human_bytes(before)} → {human_bytes(after)} "
                  "(plus GGUF metadata and the tokenizer)")


def extract_plan(console: Console, plan: Any, rule: Any, as_json: bool, budget: Any = None,
                 qalora_group_size: int | None = None, verbose: bool = False, refine: Any = None) -> None:
    rows = [{"name": e.name, "shape": list(e.shape), "action": e.action, "reason": e.reason} for e in plan.entries]
    bound = plan.max_adapter_params(rule, qalora_group_size)
    if as_json:
        echo_json({"tensors": rows, "max_adapter_params": bound, "notes": plan.notes,
                   "only_in_base": plan.only_in_base, "only_in_tuned": plan.only_in_tuned})
        return
    if verbose:
        table = Table(title="plan (dry run, nothing written)")
        table.add_column("tensor", overflow="fold", min_width=24)
        for col in ("shape", "action", "reason"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], "×".join(map(str, r["shape"])), r["action"], r["reason"])
        console.print(table)
    else:
        groups: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
        for r in rows:
            nbytes = 4 * math.prod(r["shape"])
            groups.setdefault((r["action"], r["reason"]), []).append(("×".join(map(str, r["shape"])), nbytes, nbytes))
        _plan_summary(console, "plan (dry run, nothing written; every tensor: --verbose)", groups,
                      size_column="float32 size")
    if budget is not None:
        console.print(f"ranks allocated after the SVDs under {budget.describe()}, each at most {rule.max_rank}")
    else:
        console.print(f"at most {bound:,} adapter parameters under {rule.describe()}")
    if qalora_group_size:
        console.print(f"QA-LoRA form: lora_A over inputs pooled in groups of {qalora_group_size}, extracted against "
                      "the quantized base (checked: it holds every target weight, the group size divides their "
                      "inputs)")
    if refine is not None:
        from compress.pipeline.extract_refine import MODEL_COPIES

        memory = 4 * MODEL_COPIES * sum(math.prod(r["shape"]) for r in rows)
        console.print(f"then {refine.steps} Adam steps (lr {refine.lr:g}) refine every factor against the tuned "
                      f"model's next-token distributions on the calibration text; the base and the tuned model are "
                      f"held in float32 meanwhile (about {human_bytes(int(memory))})")
    notes(console, plan.notes)


def merge_plan(console: Console, plan: Any, as_json: bool, verbose: bool = False) -> None:
    from compress.pipeline.run import json_safe

    data = plan.as_dict()
    if as_json:
        echo_json(json_safe(data))
        return
    adapters = Table(title=f"merge plan: {plan.options.method.describe()} (dry run, nothing written)")
    for col in ("adapter", "weight", "modules", "ranks", "features"):
        adapters.add_column(col)
    for a in data["adapters"]:
        adapters.add_row(a["label"], f"{a['weight']:g}", str(a["modules"]), str(a["ranks"]), ", ".join(a["features"]))
    console.print(adapters)
    if verbose:
        table = Table(title="tensors the adapters change")
        table.add_column("tensor", overflow="fold", min_width=24)
        for col in ("shape", "dtype", "adapters", "kinds"):
            table.add_column(col)
        for t in data["tensors"]:
            table.add_row(t["name"], "×".join(map(str, t["shape"])), t["dtype"], ", ".join(t["adapters"]),
                          ", ".join(t["kinds"]))
    else:  # one row per (adapters, kinds, dtype): how many tensors, of which shapes
        groups: dict[tuple[str, str, str], dict[str, int]] = {}
        for t in data["tensors"]:
            shapes = groups.setdefault((", ".join(t["adapters"]), ", ".join(t["kinds"]), t["dtype"]), {})
            shape = "×".join(map(str, t["shape"]))
            shapes[shape] = shapes.get(shape, 0) + 1
        table = Table(title="tensors the adapters change (every tensor: --verbose)")
        for col in ("adapters", "kinds", "dtype", "tensors", "shapes"):
            table.add_column(col, overflow="fold")
        for (names, kinds, dtype), shapes in groups.items():
            listed = ", ".join(f"{s} ×{n}" for s, n in list(shapes.items())[:4])
            if len(shapes) > 4:
                listed += f", and {len(shapes) - 4} more"
            table.add_row(names, kinds, dtype, str(sum(shapes.values())), listed)
    console.print(table)
    console.print(f"{len(data['tensors'])} tensors change ({data['params_changed']:,} parameters), "
                  f"{data['tensors_unchanged']} {'is' if data['tensors_unchanged'] == 1 else 'are'} copied unchanged")
    notes(console, data["notes"])


def merge_result(console: Console, merged: Any, *, as_json: bool, quiet: bool) -> None:
    """A merge's end: the float or GGUF report, or the requantization summary of a quantized folder."""
    if merged.kind != "folder" or as_json:
        result(console, merged.out, merged.report, merged.size, as_json=as_json, quiet=quiet,
               report_json=merged.report_json)
        return
    if quiet:
        return
    t = merged.requant.totals()
    used = ", ".join(f"{k} {v}" for k, v in t["strategies_used"].items())
    console.print(f"merged {t['tensors']} tensors ({used}); mean error against the ideal {t['mean_rel_error']:.4g}, "
                  f"update lost {t['mean_update_lost']:.3f} on average, {t['tensors_mostly_lost']} tensors mostly "
                  "lost")
    notes(console, merged.requant.notes)
    console.print(f"wrote {merged.out} ({human_bytes(merged.size)}); report: {merged.out / 'report.md'}")


def dequantized(console: Console, summary: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    if as_json:
        echo_json(summary)
    elif not quiet:
        console.print(f"wrote {summary['output']}: {summary['dequantized']} weights dequantized, {summary['tensors']} "
                      f"tensors, {human_bytes(summary['bytes'])}")


def inspected(console: Console, data: dict[str, Any], *, as_json: bool, show_tensors: bool) -> None:
    if as_json:
        echo_json(data)
        return
    summary = Table(title=data["path"], show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("model type", str(data["model_type"]))
    summary.add_row("layout", data["format"])
    summary.add_row("tensors / parameters", f"{data['tensors']} / {data['parameters']:,}")
    summary.add_row("size on disk", f"{human_bytes(data['bytes'])} ({data['bits_per_parameter']:.2f} bits per "
                                    "parameter)")
    summary.add_row("quantized tensors / parameters", f"{data['quantized_tensors']} / {data['quantized_parameters']:,}")
    for kind, g in data["by_quantization"].items():
        summary.add_row(f"  {kind}", f"{g['tensors']} tensors, {human_bytes(g['bytes'])}")
    for kind, g in data["by_dtype"].items():
        summary.add_row(f"dtype {kind}", f"{g['tensors']} tensors, {human_bytes(g['bytes'])}")
    console.print(summary)
    if show_tensors:
        table = Table()
        table.add_column("tensor", overflow="fold", min_width=24)
        for col in ("shape", "dtype", "quantization", "bytes"):
            table.add_column(col, no_wrap=True)
        for r in data["tensor_list"]:
            table.add_row(r["name"], "×".join(map(str, r["shape"])), r["dtype"], r["quantization"] or "-",
                          human_bytes(r["bytes"]))
        console.print(table)


def evaluated(console: Console, data: dict[str, Any], *, as_json: bool, quiet: bool) -> None:
    from compress.pipeline.run import json_safe

    if as_json:
        echo_json(json_safe(data))
        return
    if quiet:
        return
    metric = data["metric"]
    table = Table(title=f"{metric} ({'sentence embeddings' if metric == 'mean_cosine' else data['text']})")
    table.add_column("model", overflow="fold", min_width=24)
    for col in ("loader", "size", metric.replace("_", " "), "Δ vs first", "tokens/s"):
        table.add_column(col, justify="right" if col != "loader" else "left")
    for row in data["models"]:
        speed = f"{row['tokens_per_second']:.0f}" if "tokens_per_second" in row else "—"
        table.add_row(row["model"], row["loader"], human_bytes(row["size_bytes"]), f"{row[metric]:.4f}",
                      f"{row['delta']:+.4f} ({row['delta_pct']:+.2f}%)", speed)
    console.print(table)
    compared = [row for row in data["models"] if "kl_mean" in row]
    if compared:
        _kl_table(console, data["models"][0]["model"], compared)


def _kl_table(console: Console, first: str, rows: list[dict[str, Any]]) -> None:
    """The eval display's second table: next-token distributions of the later models against the first's (a
    table of its own: beside the perplexity columns it would not fit a terminal)."""
    table = Table(title=f"next-token distributions against {first}")
    table.add_column("model", overflow="fold", min_width=24)
    for col in ("KL mean", "KL median", "KL p99", "top-1"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["model"], f"{row['kl_mean']:.5f} ± {row['kl_mean_se']:.5f}", f"{row['kl_median']:.5f}",
                      f"{row['kl_p99']:.5f}", f"{100 * row['top1_agreement']:.2f}%")
    console.print(table)
    console.print(f"KL(P_first ‖ P_model) in nats per scored token ({rows[0]['tokens']}): mean ± standard error, "
                  "median, 99th percentile; top-1: share of those tokens whose most likely next token is the first "
                  "model's.")


def methods(console: Console) -> None:
    table = Table(title="methods")
    for col in ("method", "what", "formats", "reference"):
        table.add_column(col)
    for m in METHODS.values():
        formats = ", ".join(f.name for f in FORMATS.values() if m.name in f.methods)
        table.add_row(m.name, m.summary, formats, m.reference)
    console.print(table)
    formats_table = Table(title="formats")
    for col in ("format", "methods", "what"):
        formats_table.add_column(col)
    for f in FORMATS.values():
        formats_table.add_row(f.name, ", ".join(f.methods), f.summary)
    console.print(formats_table)
