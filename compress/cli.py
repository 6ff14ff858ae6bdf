"""The `compress` command line: parse options, call the pipeline, display with rich.

Every user error is a :class:`~compress.errors.CompressError` (or a click usage error) and ends as
one line on stderr with exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table

from compress import __version__
from compress.errors import CompressError, InputError, OptionError
from compress.formats import FORMATS
from compress.formats.base import dtype_name
from compress.formats.checkpoint import open_checkpoint
from compress.formats.quantized import DequantizingReader, format_of, open_model
from compress.formats.writer import (
    ShardedWriter,
    TensorSpec,
    atomic_output_dir,
    check_output_path,
    write_json,
)
from compress.merge.adapter import QALORA_POOLING
from compress.merge.combine import COMBINE_METHODS
from compress.merge.requant import STRATEGIES
from compress.pipeline.gguf_run import check_gguf_output, plan_gguf, quantize_to_gguf, sidecar_paths, write_text_atomic
from compress.pipeline.plan import Plan, make_plan
from compress.pipeline.report import human_bytes, parse_size
from compress.pipeline.run import execute, json_safe, resolve_device, write_sidecar_files
from compress.quant import METHODS, config_to_dict, describe_config, make_config

err_console = Console(stderr=True, emoji=False)
out_console = Console(emoji=False)
_invocation: list[str] = []  # the command line of this run, for provenance

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
FORMAT_HELP = "; ".join(f"{f.name} ({'/'.join(f.methods)}): {f.summary}" for f in FORMATS.values())


def _pairs() -> str:
    return ", ".join(f"{m}+{f.name}" for f in FORMATS.values() for m in f.methods)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="compress")
def cli() -> None:
    """Make large language models cheap to ship: 4-bit quantization with an accuracy report."""


def common_output_options(f: Any) -> Any:
    f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of tables.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar and no tables.")(f)
    f = click.option("--force", is_flag=True, help="Replace OUT if it exists (atomically, after success).")(f)
    f = click.option("--shard-size", default="5GB", show_default=True,
                     help="Largest safetensors shard, e.g. 500MB, 2GiB.")(f)
    return f


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Output folder (required unless --dry-run).")
@click.option("--method", type=click.Choice(list(METHODS)), default="nf4", show_default=True, help=METHOD_HELP)
@click.option("--format", "format_name", type=click.Choice(list(FORMATS)), default=None,
              help=f"Output layout (default: the method's natural one). {FORMAT_HELP}")
@click.option("--block-size", type=int, default=64, show_default=True, help="nf4/fp4: elements per absmax block.")
@click.option("--double-quant/--no-double-quant", default=False, show_default=True,
              help="nf4/fp4: quantize the absmax values to 8 bits too (~0.37 fewer bits per weight).")
@click.option("--group-size", type=int, default=128, show_default=True, help="int4: input channels per group.")
@click.option("--sym/--asym", "symmetric", default=False, show_default=True,
              help="int4: symmetric (zero fixed at 8) or asymmetric (4-bit zero per group).")
@click.option("--include", default=None, help="Regex: also quantize 2-D float weights whose name matches.")
@click.option("--exclude", default=None, help="Regex: keep tensors whose name matches in their dtype.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the math runs (auto: CUDA when available).")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, methods, projected size); write nothing.")
@common_output_options
def quantize(model: Path, out: Path | None, method: str, format_name: str | None, block_size: int,
             double_quant: bool, group_size: int, symmetric: bool, include: str | None, exclude: str | None,
             device: str, dry_run: bool, force: bool, quiet: bool, as_json: bool, shard_size: str) -> None:
    """Quantize the Linear weights of MODEL (HF folder, .safetensors or .gguf) to 4 bits."""
    started = time.time()
    fmt = FORMATS[format_name or METHODS[method].default_format]
    if method not in fmt.methods:
        raise OptionError(f"--format {fmt.name} cannot hold --method {method}",
                          fix=f"Pairs that work: {_pairs()}.")
    try:
        config = make_config(method, block_size=block_size, double_quant=double_quant, group_size=group_size,
                             symmetric=symmetric)
    except ValueError as e:
        raise OptionError(str(e), fix="See `compress quantize --help` for the allowed values.") from e
    shard_bytes = _shard_bytes(shard_size)
    torch_device = resolve_device(device)
    if out is None and not dry_run:
        raise OptionError("missing output folder", fix="Pass -o OUT (or --dry-run to only see the plan).")
    if fmt.container == "file":
        _quantize_to_file(model, out, method, include=include, exclude=exclude, dry_run=dry_run, force=force,
                          quiet=quiet, as_json=as_json, started=started)
        return
    if out is not None and not dry_run:
        check_output_path(out, force=force, inputs=[model])
    with open_model(model) as reader:
        plan = make_plan(reader.infos(), method, config, fmt, include=include, exclude=exclude)
        if not plan.quantized and not dry_run:
            raise OptionError("no tensor is selected for quantization",
                              fix="Check --include/--exclude, or run with --dry-run to see why each tensor is kept.")
        if dry_run:
            _show_plan(plan, as_json)
            return
        assert out is not None
        with atomic_output_dir(out, force=force) as tmp:
            report = _with_progress(
                f"{plan.method} ({describe_config(plan.config)})", plan.input_bytes, quiet or as_json,
                lambda progress: execute(plan, reader, tmp, device=torch_device, shard_bytes=shard_bytes,
                                         progress=progress))
            if isinstance(reader, DequantizingReader):
                report.notes.append(f"the input was already quantized ({reader.format.name}); it was dequantized "
                                    "and quantized again, so errors are measured against the dequantized input")
            write_sidecar_files(tmp, plan, reader, report)
            _write_provenance(tmp, "quantize", model, out, started, torch_device,
                              {"method": method, "parameters": config_to_dict(plan.config), "format": fmt.name,
                               "include": include, "exclude": exclude, "shard_size": shard_bytes})
    _show_result(out, report, report.bytes_after, as_json=as_json, quiet=quiet)


def _quantize_to_file(model: Path, out: Path | None, method: str, *, include: str | None, exclude: str | None,
                      dry_run: bool, force: bool, quiet: bool, as_json: bool, started: float) -> None:
    """`quantize --format gguf`: a single llama.cpp file plus its report and provenance beside it."""
    if include is not None or exclude is not None:
        raise OptionError("--include/--exclude do not apply to --format gguf",
                          fix="llama.cpp needs every tensor; the types are chosen per tensor (see --dry-run).")
    if out is not None and not dry_run:
        check_gguf_output(out, force=force, inputs=[model])
    with open_model(model) as reader:
        planned, notes = plan_gguf(reader, method)
        if dry_run:
            _show_gguf_plan(reader, planned, notes, method, as_json)
            return
        assert out is not None
        total = sum(i.nbytes for i in reader.infos())
        report = _with_progress(f"{method} (gguf)", total, quiet or as_json,
                                lambda progress: quantize_to_gguf(reader, out, method, force=force,
                                                                  progress=progress))
        if isinstance(reader, DequantizingReader):
            report.notes.append(f"the input was already quantized ({reader.format.name}); it was dequantized "
                                "and quantized again, so errors are measured against the dequantized input")
    side = sidecar_paths(out)
    write_text_atomic(side["report_json"], json.dumps(json_safe(report.as_dict()), indent=2) + "\n")
    write_text_atomic(side["report_md"], report.to_markdown())
    _write_provenance(side["provenance"], "quantize", model, out, started, torch.device("cpu"),
                      {"method": method, "parameters": report.parameters, "format": "gguf"})
    _show_result(out, report, report.bytes_after, as_json=as_json, quiet=quiet, report_json=side["report_json"])


def _show_gguf_plan(reader: Any, planned: list[Any], notes: list[str], method: str, as_json: bool) -> None:
    infos = {i.name: i for i in reader.infos()}
    rows = [{"name": t.source, "gguf_name": t.name, "shape": list(t.shape), "type": t.qtype.upper(),
             "bytes_before": infos[t.source].nbytes, "bytes_after": t.nbytes} for t in planned]
    before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
    if as_json:
        click.echo(json.dumps({"method": method, "format": "gguf", "bytes_before": before, "bytes_after": after,
                               "notes": notes, "tensors": rows}, indent=2))
        return
    table = Table(title=f"plan: {method} → gguf (dry run, nothing written)")
    table.add_column("tensor", overflow="fold", min_width=24)
    for col in ("gguf name", "shape", "type", "bytes → after"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["gguf_name"], "×".join(map(str, r["shape"])), r["type"],
                      f"{human_bytes(r['bytes_before'])} → {human_bytes(r['bytes_after'])}")
    out_console.print(table)
    for note in notes:
        out_console.print(f"[yellow]note:[/] {note}")
    out_console.print(f"{len(rows)} tensors; projected size {human_bytes(before)} → {human_bytes(after)} "
                      "(plus GGUF metadata and the tokenizer)")


def _shard_bytes(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise OptionError(f"--shard-size {text!r} is not a size",
                          fix="Use a number with a unit, e.g. 5GB or 500MB.") from e


def _show_result(out: Path, report: Any, size: int, *, as_json: bool, quiet: bool,
                 report_json: Path | None = None) -> None:
    """The end of a run: report.json on stdout with --json, else the tables and notes."""
    report_json = report_json or out / "report.json"
    if as_json:
        click.echo(json.dumps(json.loads(report_json.read_text()), indent=2))
    elif not quiet:
        for table in report.rich_tables():
            out_console.print(table)
        for note in report.notes:
            out_console.print(f"[yellow]note:[/] {note}")
        out_console.print(f"wrote {out} ({human_bytes(size)}); report: {report_json.with_suffix('.md')}")


def _show_plan(plan: Plan, as_json: bool) -> None:
    data = {
        "method": plan.method, "parameters": config_to_dict(plan.config), "format": plan.format.name,
        "bytes_before": plan.input_bytes, "bytes_after": plan.output_bytes,
        "tensors": [{"name": e.info.name, "shape": list(e.info.shape),
                     "dtype": dtype_name(e.info.dtype),
                     "action": "quantize" if e.quantize else "keep", "reason": e.reason,
                     "bytes_before": e.info.nbytes, "bytes_after": e.output_bytes} for e in plan.entries],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"plan: {describe_config(plan.config)} → {plan.format.name} (dry run, nothing written)")
    table.add_column("tensor", overflow="fold", min_width=24)
    for col in ("shape", "dtype", "action", "reason", "bytes → after"):
        table.add_column(col)
    for e in plan.entries:
        table.add_row(e.info.name, "×".join(map(str, e.info.shape)), dtype_name(e.info.dtype),
                      "quantize" if e.quantize else "keep", e.reason,
                      f"{human_bytes(e.info.nbytes)} → {human_bytes(e.output_bytes)}")
    out_console.print(table)
    out_console.print(f"{len(plan.quantized)} tensors to quantize, {len(plan.kept)} kept; projected size "
                      f"{human_bytes(plan.input_bytes)} → {human_bytes(plan.output_bytes)}")


def _write_provenance(where: Path, command: str, source: Path, out: Path, started: float, device: torch.device,
                      details: dict[str, Any]) -> None:
    """Provenance into ``where``: a folder (its compress_provenance.json) or a file path."""
    finished = time.time()
    write_json(where / "compress_provenance.json" if where.is_dir() else where, {
        "tool": "compress", "version": __version__, "command": command, "argv": ["compress", *_invocation],
        **details,
        "input": str(source.resolve()), "output": str(out.resolve()), "device": str(device),
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(),
        "wall_seconds": round(finished - started, 3),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    })


@cli.command("extract-lora")
@click.option("--base", "base_path", required=True, type=click.Path(path_type=Path), help="The base checkpoint.")
@click.option("--tuned", "tuned_path", required=True, type=click.Path(path_type=Path),
              help="The fine-tuned checkpoint (same architecture).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Adapter folder (required unless --dry-run).")
@click.option("--rank", type=int, default=None, help="Fixed rank for every module (default 16 when no rule is given).")
@click.option("--energy", type=float, default=None,
              help="Smallest rank whose retained energy sum(s_i^2)/||dW||^2 reaches this fraction (0, 1].")
@click.option("--sv-threshold", type=float, default=None, help="Keep singular values above this absolute value.")
@click.option("--max-rank", type=int, default=256, show_default=True, help="Cap for every rule.")
@click.option("--svd", "engine", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="exact: full float32 SVD; randomized: range finder + power iterations; auto: randomized when the "
                   "rank is at most 1/4 of the matrix's smaller side.")
@click.option("--targets", default="all-linear", show_default=True,
              help="'all-linear' (Linear weights in the transformer blocks) or a regex searched in weight names.")
@click.option("--embeddings", type=click.Choice(["skip", "lora", "full"]), default="skip", show_default=True,
              help="Embeddings and lm_head: skip (serving engines reject them), LoRA, or full copies "
                   "(modules_to_save).")
@click.option("--dtype", "dtype_choice", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="dtype of the saved factors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the math runs (auto: CUDA when available).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the largest possible adapter; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of tables.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no tables.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (atomically, after success).")
def extract_lora(base_path: Path, tuned_path: Path, out: Path | None, rank: int | None, energy: float | None,
                 sv_threshold: float | None, max_rank: int, engine: str, targets: str, embeddings: str,
                 dtype_choice: str, seed: int, device: str, dry_run: bool, as_json: bool, quiet: bool,
                 force: bool) -> None:
    """Recover a PEFT LoRA adapter from BASE and TUNED by truncated SVD of each weight delta."""
    from compress.lowrank.svd import RankRule
    from compress.pipeline.extract import ExtractOptions, execute_extraction, plan_extraction

    started = time.time()
    if rank is None and energy is None and sv_threshold is None:
        rank = 16
    try:
        rule = RankRule(rank=rank, energy=energy, sv_threshold=sv_threshold, max_rank=max_rank)
        options = ExtractOptions(rule=rule, engine=engine, targets=targets, embeddings=embeddings,
                                 dtype=getattr(torch, dtype_choice), seed=seed)
    except ValueError as e:
        raise OptionError(str(e), fix="See `compress extract-lora --help`.") from e
    torch_device = resolve_device(device)
    if out is None and not dry_run:
        raise OptionError("missing output folder", fix="Pass -o ADAPTER (or --dry-run to only see the plan).")
    if out is not None and not dry_run:
        check_output_path(out, force=force, inputs=[base_path, tuned_path])
    with open_model(base_path) as base, open_model(tuned_path) as tuned:
        plan = plan_extraction(base, tuned, options)
        if dry_run:
            rows = [{"name": e.name, "shape": list(e.shape), "action": e.action, "reason": e.reason}
                    for e in plan.entries]
            bound = plan.max_adapter_params(rule)
            if as_json:
                click.echo(json.dumps({"tensors": rows, "max_adapter_params": bound, "notes": plan.notes,
                                       "only_in_base": plan.only_in_base, "only_in_tuned": plan.only_in_tuned},
                                      indent=2))
                return
            table = Table(title="plan (dry run, nothing written)")
            table.add_column("tensor", overflow="fold", min_width=24)
            for col in ("shape", "action", "reason"):
                table.add_column(col)
            for r in rows:
                table.add_row(r["name"], "×".join(map(str, r["shape"])), r["action"], r["reason"])
            out_console.print(table)
            out_console.print(f"at most {bound:,} adapter parameters under {rule}")
            for note in plan.notes:
                out_console.print(f"[yellow]note:[/] {note}")
            return
        assert out is not None
        total = sum(math.prod(e.shape) * 4 for e in plan.entries)
        with atomic_output_dir(out, force=force) as tmp:
            spec, report = _with_progress(
                "extract-lora", total, quiet or as_json,
                lambda progress: execute_extraction(plan, base, tuned, options, device=torch_device,
                                                    base_name=str(base_path), progress=progress))
            if not spec.modules:
                raise InputError("the tuned model does not differ from the base in any extractable module",
                                 fix="Check that --tuned is really the fine-tuned model, or widen --targets.")
            _write_adapter(tmp, spec)
            write_json(tmp / "report.json", json_safe(report.as_dict()))
            (tmp / "report.md").write_text(report.to_markdown(), encoding="utf-8")
            _write_provenance(tmp, "extract-lora", tuned_path, out, started, torch_device,
                              {"base": str(base_path.resolve()), "rule": report.rule, "targets": targets,
                               "embeddings": embeddings, "dtype": dtype_choice, "seed": seed})
    _show_result(out, report, report.adapter_bytes, as_json=as_json, quiet=quiet)


def _with_progress(label: str, total: int, quiet: bool, work: Any) -> Any:
    """Run ``work(progress_callback)`` under a rich progress bar (or none when quiet)."""
    if quiet or not err_console.is_terminal:
        return work(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(label, total=total)

        def advance(name: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, description=name[-50:])

        return work(advance)


def _write_adapter(folder: Path, spec: Any) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in spec.state_dict().items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", spec.config())


@cli.command()
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Float checkpoint folder.")
@click.option("--dtype", "dtype_choice", type=click.Choice(["original", "float32", "float16", "bfloat16"]),
              default="original", show_default=True, help="Dtype of the dequantized weights.")
@common_output_options
def dequantize(quantized: Path, out: Path, dtype_choice: str, force: bool, quiet: bool, as_json: bool,
               shard_size: str) -> None:
    """Turn a quantized checkpoint (any --format output, or a .gguf) back into a float checkpoint."""
    started = time.time()
    shard_bytes = _shard_bytes(shard_size)
    check_output_path(out, force=force, inputs=[quantized])
    from compress.formats.gguf_reader import GGUFReader

    with open_model(quantized) as reader:
        is_gguf = isinstance(reader, GGUFReader)
        if not is_gguf and (not isinstance(reader, DequantizingReader)
                            or not any(reader.is_quantized(i.name) for i in reader.infos())):
            raise InputError("no quantized weights found", where=str(quantized),
                             fix="`compress dequantize` reads outputs of `compress quantize` (layouts: "
                                 f"{', '.join(FORMATS)}).")

        def is_quantized(name: str) -> bool:  # a GGUF's tensors are all decoded (to float32)
            return is_gguf or (isinstance(reader, DequantizingReader) and reader.is_quantized(name))

        dtype = None if dtype_choice == "original" else getattr(torch, dtype_choice)
        infos = reader.infos()
        specs = [TensorSpec(i.name, dtype if (dtype and is_quantized(i.name)) else i.dtype, i.shape) for i in infos]
        with atomic_output_dir(out, force=force) as tmp:
            writer = ShardedWriter(tmp, specs, shard_bytes)
            try:
                for info, spec in zip(infos, specs, strict=True):
                    writer.write(spec.name, reader.get(info.name).to(spec.dtype))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            config = dict(reader.config or {})
            if config:
                if dtype is not None:
                    config["dtype"] = dtype_choice
                write_json(tmp / "config.json", config)
            for name, source in reader.extra_files().items():
                (tmp / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
            _write_provenance(tmp, "dequantize", quantized, out, started, torch.device("cpu"),
                              {"format": "gguf" if is_gguf else reader.format.name, "dtype": dtype_choice})
    summary = {"output": str(out), "tensors": len(specs),
               "dequantized": sum(is_quantized(i.name) for i in infos), "bytes": sum(s.nbytes for s in specs)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        out_console.print(f"wrote {out}: {summary['dequantized']} weights dequantized, {summary['tensors']} tensors, "
                          f"{human_bytes(summary['bytes'])}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor (default: a summary by kind).")
def inspect(path: Path, as_json: bool, show_tensors: bool) -> None:
    """Show what is inside a checkpoint: tensors, dtypes, sizes and quantization."""
    from compress.formats.gguf_reader import GGUFReader

    with open_checkpoint(path) as raw:
        fmt = format_of(raw)
        qconfig = (raw.config or {}).get("quantization_config")
        reader = DequantizingReader(raw, fmt) if fmt is not None else None
        stored = raw.infos()
        rows = []
        stored_bytes = {i.name: i.nbytes for i in stored}
        infos = reader.infos() if reader else stored
        gguf_file = raw if isinstance(raw, GGUFReader) else None
        for info in infos:
            if gguf_file is not None:  # a GGUF's tensors are read as float32; show what the file stores
                _gguf_name, qtype, nbytes = gguf_file.stored(info.name)
                desc = "" if qtype in ("F32", "F16", "BF16") else qtype
                rows.append({"name": info.name, "shape": list(info.shape), "dtype": qtype.lower(),
                             "quantization": desc, "bytes": nbytes})
                continue
            if reader is not None and reader.is_quantized(info.name):
                qt = reader.quantized(info.name)
                keys = reader.format.stored_keys(info.name, set(stored_bytes))
                desc = _describe_quantized(qt)
                nbytes = sum(stored_bytes[k] for k in keys)
            else:
                desc, nbytes = "", info.nbytes
            rows.append({"name": info.name, "shape": list(info.shape), "dtype": dtype_name(info.dtype),
                         "quantization": desc, "bytes": nbytes})
        params = sum(math.prod(r["shape"]) for r in rows)
        total_bytes = sum(r["bytes"] for r in rows)
        q_rows = [r for r in rows if r["quantization"]]
        data = {
            "path": str(path), "format": "gguf" if gguf_file is not None else (fmt.name if fmt else "float"),
            "quantization_config": qconfig, "model_type": (raw.config or {}).get("model_type"),
            "tensors": len(rows), "parameters": params, "bytes": total_bytes,
            "bits_per_parameter": 8 * total_bytes / params if params else 0.0,
            "quantized_tensors": len(q_rows), "quantized_parameters": sum(math.prod(r["shape"]) for r in q_rows),
            "by_dtype": _group(rows, "dtype"), "by_quantization": _group(q_rows, "quantization"),
            "tensor_list": rows if (show_tensors or as_json) else None,
        }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    summary = Table(title=f"{path}", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("model type", str(data["model_type"]))
    summary.add_row("layout", data["format"])
    summary.add_row("tensors / parameters", f"{data['tensors']} / {params:,}")
    summary.add_row("size", f"{human_bytes(total_bytes)} ({data['bits_per_parameter']:.2f} bits per parameter)")
    summary.add_row("quantized tensors / parameters", f"{len(q_rows)} / {data['quantized_parameters']:,}")
    for kind, g in data["by_quantization"].items():
        summary.add_row(f"  {kind}", f"{g['tensors']} tensors, {human_bytes(g['bytes'])}")
    for kind, g in data["by_dtype"].items():
        summary.add_row(f"dtype {kind}", f"{g['tensors']} tensors, {human_bytes(g['bytes'])}")
    out_console.print(summary)
    if show_tensors:
        table = Table()
        table.add_column("tensor", overflow="fold", min_width=24)
        for col in ("shape", "dtype", "quantization", "bytes"):
            table.add_column(col, no_wrap=True)
        for r in rows:
            table.add_row(r["name"], "×".join(map(str, r["shape"])), r["dtype"], r["quantization"] or "-",
                          human_bytes(r["bytes"]))
        out_console.print(table)


def _group(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = {}
    for r in rows:
        g = groups.setdefault(r[key], {"tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += r["bytes"]
    return groups


def _describe_quantized(qt: Any) -> str:
    from compress.quant import Int4Tensor, NF4Tensor

    if isinstance(qt, NF4Tensor):
        return f"{qt.quant_type} b{qt.block_size}" + (" +dq" if qt.double_quant else "")
    if isinstance(qt, Int4Tensor):
        return f"int4 g{qt.group_size} {'sym' if qt.symmetric else 'asym'}"
    return type(qt).__name__


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to score (default: the Python Language Reference shipped with CPython).")
@click.option("--tokens", type=int, default=20000, show_default=True, help="Score the first N tokens of the text.")
@click.option("--window", type=int, default=1024, show_default=True, help="Tokens per forward pass.")
@click.option("--stride", type=int, default=None, help="Window step (default: --window, no overlap).")
@click.option("--embeddings", is_flag=True, help="Encoders: cosine of sentence embeddings against the first model.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Also write report.json and report.md into this folder.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the models run (auto: CUDA when available).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
@click.option("--force", is_flag=True, help="Replace the -o folder if it exists.")
def evaluate(models: tuple[Path, ...], text_path: Path | None, tokens: int, window: int, stride: int | None,
             embeddings: bool, out: Path | None, device: str, as_json: bool, quiet: bool, force: bool) -> None:
    """What compression cost: perplexity of causal LMs (or embedding cosine of encoders), side by side."""
    import gc

    from compress import evaluation

    transformers = evaluation.require_transformers()
    started = time.time()
    stride = stride or window
    if window < 2 or tokens < 2 or not 1 <= stride <= window:
        raise OptionError(f"need --window >= 2, --tokens >= 2 and 1 <= --stride <= --window (got {window}, {tokens}, "
                          f"{stride})", fix="Pick sizes such as --window 1024 --tokens 20000.")
    torch_device = resolve_device(device)
    if out is not None:
        check_output_path(out, force=force, inputs=list(models))
    for m in models:
        if not m.exists():
            raise InputError("no such file or folder", where=str(m), fix="Check the path.")
    if text_path is not None:
        try:
            text = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the text ({e})", where=str(text_path),
                             fix="Give a readable UTF-8 text file.") from e
    else:
        text = evaluation.default_text()
    keep: list[Any] = []
    rows: list[dict[str, Any]] = []
    tokenizer = None
    reference: Any = None
    for path in models:
        loaded = evaluation.load_model(path, encoder=embeddings, device=torch_device, keep=keep)
        if tokenizer is None and loaded.tokenizer_dir is not None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
        if tokenizer is None:
            raise InputError("no tokenizer found", where=str(path),
                             fix="List first a model whose folder (or GGUF) carries its tokenizer.")
        row: dict[str, Any] = {"model": str(path), "loader": loaded.how, "size_bytes": loaded.size_bytes}
        if embeddings:
            sentences = evaluation.default_sentences()
            emb = evaluation.sentence_embeddings(loaded.model, tokenizer, sentences)
            if reference is None:
                reference = emb
            cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
            row.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()), sentences=len(sentences))
        else:
            ids = torch.tensor(tokenizer(text)["input_ids"][:tokens])
            if ids.numel() < 2:
                raise InputError("the text has fewer than 2 tokens", where=str(text_path or "default text"),
                                 fix="Give a longer text.")
            ppl, scored = _with_progress(
                path.name, ids.numel(), quiet or as_json,
                lambda progress, ids=ids, model=loaded.model, name=path.name: evaluation.perplexity(
                    model, ids, window=window, stride=stride,
                    progress=(lambda n: progress(name, n)) if progress else None))
            row.update(perplexity=ppl, tokens=scored)
        rows.append(row)
        del loaded
        gc.collect()
    metric = "mean_cosine" if embeddings else "perplexity"
    for row in rows:
        row["delta"] = row[metric] - rows[0][metric]
        row["delta_pct"] = 100 * row["delta"] / rows[0][metric] if rows[0][metric] else 0.0
    result = {"metric": metric, "window": window, "stride": stride, "tokens": tokens,
              "text": str(text_path) if text_path else "pydoc_data/topics.py (Python Language Reference)",
              "models": rows}
    if out is not None:
        with atomic_output_dir(out, force=force) as tmp:
            write_json(tmp / "report.json", json_safe(result))
            (tmp / "report.md").write_text(_eval_markdown(result), encoding="utf-8")
            _write_provenance(tmp, "eval", models[0], out, started, torch_device, {"models": [str(m) for m in models]})
    if as_json:
        click.echo(json.dumps(json_safe(result), indent=2))
    elif not quiet:
        table = Table(title=f"{metric} ({'sentence embeddings' if embeddings else result['text']})")
        table.add_column("model", overflow="fold", min_width=24)
        for col in ("loader", "size", metric.replace("_", " "), "Δ vs first"):
            table.add_column(col, justify="right" if col != "loader" else "left")
        for row in rows:
            table.add_row(row["model"], row["loader"], human_bytes(row["size_bytes"]), f"{row[metric]:.4f}",
                          f"{row['delta']:+.4f} ({row['delta_pct']:+.2f}%)")
        out_console.print(table)


def _eval_markdown(result: dict[str, Any]) -> str:
    metric = result["metric"]
    lines = [f"# compress eval: {metric}", "", f"Text: {result['text']}; window {result['window']}, stride "
             f"{result['stride']}, up to {result['tokens']} tokens.", "",
             f"| model | loader | size | {metric} | Δ vs first |", "|---|---|---|---|---|"]
    for row in result["models"]:
        lines.append(f"| `{row['model']}` | {row['loader']} | {human_bytes(row['size_bytes'])} | {row[metric]:.4f} | "
                     f"{row['delta']:+.4f} ({row['delta_pct']:+.2f}%) |")
    return "\n".join(lines) + "\n"


@cli.command("merge")
@click.argument("base_path", metavar="BASE", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_paths", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A PEFT LoRA adapter folder (repeat for several; QA-LoRA, DoRA, rsLoRA adapters included).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each adapter, in --adapter order (repeat; default 1.0 for every adapter).")
@click.option("--combine", "combine_name", type=click.Choice(list(COMBINE_METHODS)), default="sum", show_default=True,
              help="; ".join(f"{m.name}: {m.summary} ({m.paper})" for m in COMBINE_METHODS.values()))
@click.option("--density", type=float, default=None,
              help="ties: fraction of each delta kept by magnitude; dare: probability an element survives "
                   "(default 0.5).")
@click.option("--rank", type=int, default=None, help="svd: target rank (default: the largest adapter rank).")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the drop masks; svd: of the "
              "randomized SVD.")
@click.option("--qalora-pooling", type=click.Choice(list(QALORA_POOLING)), default="peft", show_default=True,
              help="How QA-LoRA adapters pooled each input group in training: peft (PEFT 0.21: group mean times "
                   "in/g), mean (QA-LoRA reference code), sum (QA-LoRA paper).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Output checkpoint folder (required unless --dry-run).")
@click.option("--quantize", "quantize_method", type=click.Choice(["none", *METHODS]), default="none",
              show_default=True, help="Quantize the merged model (none: a float checkpoint in the base's dtype). "
              f"{METHOD_HELP}")
@click.option("--format", "format_name", type=click.Choice(list(FORMATS)), default=None,
              help="Output layout with --quantize (default: the method's natural one; native keeps folded "
                   "QA-LoRA updates exact).")
@click.option("--strategy", type=click.Choice(["auto", *STRATEGIES]), default="auto", show_default=True,
              help="How updates enter quantized weights: fold (QA-LoRA: into float offsets, exact), fold-requant, "
                   "refit, requantize (dequantize, add, quantize), float (quantize float base + update); auto: "
                   "an exact fold, else float when --float-base is given, else the smallest error.")
@click.option("--float-base", "float_base_path", type=click.Path(path_type=Path), default=None,
              help="The float checkpoint a quantized BASE was made from (enables the 'float' strategy).")
@click.option("--block-size", type=int, default=64, show_default=True, help="nf4/fp4: elements per absmax block.")
@click.option("--double-quant/--no-double-quant", default=False, show_default=True,
              help="nf4/fp4: quantize the absmax values to 8 bits too.")
@click.option("--group-size", type=int, default=None,
              help="int4: input channels per group (default: the quantized base's, else 128).")
@click.option("--sym/--asym", "symmetric", default=False, show_default=True, help="int4: symmetric or asymmetric.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the math runs (auto: CUDA when available).")
@click.option("--dry-run", is_flag=True, help="Print which tensors each adapter changes; write nothing.")
@common_output_options
def merge(base_path: Path, adapter_paths: tuple[Path, ...], weights: tuple[float, ...], combine_name: str,
          density: float | None, rank: int | None, seed: int, qalora_pooling: str, out: Path | None,
          quantize_method: str, format_name: str | None, strategy: str, float_base_path: Path | None,
          block_size: int, double_quant: bool, group_size: int | None, symmetric: bool, device: str, dry_run: bool,
          force: bool, quiet: bool, as_json: bool, shard_size: str) -> None:
    """Merge LoRA adapters into BASE (a float checkpoint, or a compress NF4/INT4 output, dequantized first)."""
    from compress.merge import read_adapter
    from compress.merge.combine import make_combine, method_options
    from compress.pipeline.merge import MergedReader, MergeOptions, plan_merge, write_merged

    started = time.time()
    if weights and len(weights) != len(adapter_paths):
        raise OptionError(f"{len(weights)} --weight values for {len(adapter_paths)} adapters",
                          fix="Give one --weight per --adapter, in the same order, or none (every weight 1.0).")
    options: dict[str, Any] = {"density": density, "rank": rank}
    if "seed" in method_options(combine_name):
        options["seed"] = seed
    try:
        method = make_combine(combine_name, **options)
        merge_options = MergeOptions(method=method, weights=tuple(weights), qalora_pooling=qalora_pooling)
    except ValueError as e:
        raise OptionError(str(e), fix="See `compress merge --help`.") from e
    shard_bytes = _shard_bytes(shard_size)
    torch_device = resolve_device(device)
    if out is None and not dry_run:
        raise OptionError("missing output folder", fix="Pass -o OUT (or --dry-run to only see the plan).")
    fmt = None
    if quantize_method != "none":
        fmt = FORMATS[format_name or METHODS[quantize_method].default_format]
        if quantize_method not in fmt.methods:
            raise OptionError(f"--format {fmt.name} cannot hold --quantize {quantize_method}",
                              fix=f"Pairs that work: {_pairs()}.")
        if fmt.container == "file" and out is not None and not dry_run:
            check_gguf_output(out, force=force, inputs=[base_path, *adapter_paths])
    elif format_name is not None or float_base_path is not None or strategy != "auto":
        raise OptionError("--format, --strategy and --float-base apply only with --quantize",
                          fix="Add --quantize nf4|int4|... or drop those options.")
    if out is not None and not dry_run and (fmt is None or fmt.container == "folder"):
        check_output_path(out, force=force, inputs=[base_path, *adapter_paths])
    adapters = [read_adapter(p) for p in adapter_paths]
    with open_model(base_path) as base:
        plan = plan_merge(base, adapters, merge_options)
        if dry_run:
            _show_merge_plan(plan, as_json)
            return
        assert out is not None
        if isinstance(base, DequantizingReader):
            plan.notes.append(f"the base was quantized ({base.format.name}); the adapters were merged into its "
                              "dequantized weights")
        merged = MergedReader(base, plan, device=torch_device)
        if fmt is not None:
            _merge_quantized(merged, base, fmt, quantize_method, out, started=started, base_path=base_path,
                             adapter_paths=adapter_paths, float_base_path=float_base_path, strategy=strategy,
                             block_size=block_size, double_quant=double_quant, group_size=group_size,
                             symmetric=symmetric, device=torch_device, shard_bytes=shard_bytes, force=force,
                             quiet=quiet, as_json=as_json,
                             provenance={"adapters": [str(p.resolve()) for p in adapter_paths],
                                         "weights": list(plan.weights), "combine": method.to_dict(),
                                         "qalora_pooling": qalora_pooling, "quantize": quantize_method})
            return
        total = sum(i.nbytes for i in plan.infos)
        with atomic_output_dir(out, force=force) as tmp:
            report = _with_progress("merge", total, quiet or as_json,
                                    lambda progress: write_merged(merged, tmp, shard_bytes=shard_bytes,
                                                                  progress=progress))
            _write_provenance(tmp, "merge", base_path, out, started, torch_device,
                              {"adapters": [str(p.resolve()) for p in adapter_paths], "weights": list(plan.weights),
                               "combine": method.to_dict(), "qalora_pooling": qalora_pooling,
                               "quantize": quantize_method, "shard_size": shard_bytes})
    _show_result(out, report, report.bytes_written, as_json=as_json, quiet=quiet)


def _merge_quantized(merged: Any, base: Any, fmt: Any, method: str, out: Path, *, started: float, base_path: Path,
                     adapter_paths: tuple[Path, ...], float_base_path: Path | None, strategy: str, block_size: int,
                     double_quant: bool, group_size: int | None, symmetric: bool, device: torch.device,
                     shard_bytes: int, force: bool, quiet: bool, as_json: bool, provenance: dict[str, Any]) -> None:
    """`merge --quantize`: the merged weights in a quantized layout (folder) or a GGUF file."""
    from compress.pipeline.merge_quant import execute_merge_quantized

    total = sum(i.nbytes for i in merged.infos())
    if fmt.container == "file":
        if float_base_path is not None or strategy != "auto":
            raise OptionError("--strategy and --float-base do not apply to --format gguf (the merged float weights "
                              "are quantized once)", fix="Drop them, or use a folder format such as native.")
        from compress.pipeline.merge_quant import q4_1_fold_hook

        folded: list[str] = []
        hook = q4_1_fold_hook(merged, folded) if method == "q4_1" else None
        report = _with_progress(f"merge + {method} (gguf)", total, quiet or as_json,
                                lambda progress: quantize_to_gguf(merged, out, method, force=force, progress=progress,
                                                                  quantized=hook))
        side = sidecar_paths(out)
        merge_report = merged.report()
        if folded:
            merge_report.notes.append(f"{len(folded)} QA-LoRA updates were folded into the Q4_1 block minimums "
                                      "(codes and scales of Q4_1(base) unchanged; the minimums are float16, so "
                                      "each rounds to 11 significant bits); errors are against Q4_1(base) + update")
        write_text_atomic(side["report_json"], json.dumps(json_safe(
            {"merge": merge_report.as_dict(), "quantization": report.as_dict()}), indent=2) + "\n")
        write_text_atomic(side["report_md"], merge_report.to_markdown() + "\n" + report.to_markdown())
        _write_provenance(side["provenance"], "merge", base_path, out, started, device,
                          {**provenance, "format": "gguf", "parameters": report.parameters})
        _show_result(out, report, report.bytes_after, as_json=as_json, quiet=quiet, report_json=side["report_json"])
        return
    base_group = _base_int4_group(base)
    try:
        config = make_config(method, block_size=block_size, double_quant=double_quant,
                             group_size=group_size or base_group or 128, symmetric=symmetric)
    except ValueError as e:
        raise OptionError(str(e), fix="See `compress merge --help` for the allowed values.") from e
    plan = make_plan(merged.infos(), method, config, fmt)
    if not plan.quantized:
        raise OptionError("no tensor is selected for quantization", fix="Check the base: it has no Linear weights.")
    float_base = None
    if float_base_path is not None:
        float_base = open_model(float_base_path)
        if isinstance(float_base, DequantizingReader):
            float_base.close()
            raise InputError("--float-base is itself quantized", where=str(float_base_path),
                             fix="Pass the float checkpoint the base was quantized from.")
    try:
        with atomic_output_dir(out, force=force) as tmp:
            report, requant = _with_progress(
                f"merge + {describe_config(plan.config)} ({fmt.name})", total, quiet or as_json,
                lambda progress: execute_merge_quantized(merged, plan, tmp, float_base=float_base, strategy=strategy,
                                                         device=device, shard_bytes=shard_bytes, progress=progress))
            write_sidecar_files(tmp, plan, merged, report)
            merge_report = merged.report()
            merge_report.notes += requant.notes
            write_json(tmp / "report.json", json_safe({"merge": merge_report.as_dict(),
                                                       "requantization": requant.as_dict(),
                                                       "quantization": report.as_dict()}))
            (tmp / "report.md").write_text(merge_report.to_markdown() + "\n" + requant.to_markdown() + "\n"
                                           + report.to_markdown(), encoding="utf-8")
            _write_provenance(tmp, "merge", base_path, out, started, device,
                              {**provenance, "format": fmt.name, "parameters": config_to_dict(plan.config),
                               "strategy": strategy, "float_base": str(float_base_path.resolve()) if float_base_path
                               else None, "shard_size": shard_bytes})
    finally:
        if float_base is not None:
            float_base.close()
    if as_json:
        click.echo(json.dumps(json.loads((out / "report.json").read_text()), indent=2))
        return
    if not quiet:
        t = requant.totals()
        used = ", ".join(f"{k} {v}" for k, v in t["strategies_used"].items())
        out_console.print(f"merged {t['tensors']} tensors ({used}); mean error against the ideal "
                          f"{t['mean_rel_error']:.4g}, update lost "
                          f"{t['mean_update_lost']:.3f} on average, {t['tensors_mostly_lost']} tensors mostly lost")
        for note in requant.notes:
            out_console.print(f"[yellow]note:[/] {note}")
        out_console.print(f"wrote {out} ({human_bytes(report.bytes_after)}); report: {out / 'report.md'}")


def _base_int4_group(base: Any) -> int | None:
    """The INT4 group size of a quantized base (so merged weights keep it and folds stay possible)."""
    if not isinstance(base, DequantizingReader):
        return None
    for info in base.infos():
        if base.is_quantized(info.name):
            size = getattr(base.quantized(info.name), "group_size", None)  # NF4 has blocks, not groups
            return size if isinstance(size, int) else None
    return None


def _show_merge_plan(plan: Any, as_json: bool) -> None:
    data = plan.as_dict()
    if as_json:
        click.echo(json.dumps(json_safe(data), indent=2))
        return
    adapters = Table(title=f"merge plan: {plan.options.method.describe()} (dry run, nothing written)")
    for col in ("adapter", "weight", "modules", "ranks", "features"):
        adapters.add_column(col)
    for a in data["adapters"]:
        adapters.add_row(a["label"], f"{a['weight']:g}", str(a["modules"]), str(a["ranks"]), ", ".join(a["features"]))
    out_console.print(adapters)
    table = Table(title="tensors the adapters change")
    table.add_column("tensor", overflow="fold", min_width=24)
    for col in ("shape", "dtype", "adapters", "kinds"):
        table.add_column(col)
    for t in data["tensors"]:
        table.add_row(t["name"], "×".join(map(str, t["shape"])), t["dtype"], ", ".join(t["adapters"]),
                      ", ".join(t["kinds"]))
    out_console.print(table)
    out_console.print(f"{len(data['tensors'])} tensors change ({data['params_changed']:,} parameters), "
                      f"{data['tensors_unchanged']} are copied unchanged")
    for note in data["notes"]:
        out_console.print(f"[yellow]note:[/] {note}")


@cli.command("methods")
def list_methods() -> None:
    """List quantization methods and output formats (from the registries)."""
    table = Table(title="methods")
    table.add_column("method")
    table.add_column("what")
    table.add_column("formats")
    table.add_column("reference")
    for m in METHODS.values():
        formats = ", ".join(f.name for f in FORMATS.values() if m.name in f.methods)
        table.add_row(m.name, m.summary, formats, m.reference)
    out_console.print(table)
    formats = Table(title="formats")
    formats.add_column("format")
    formats.add_column("methods")
    formats.add_column("what")
    for f in FORMATS.values():
        formats.add_row(f.name, ", ".join(f.methods), f.summary)
    out_console.print(formats)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line and exit code 2 for every user error."""
    _invocation[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="compress", standalone_mode=False)
    except CompressError as e:
        err_console.print(f"error: {e.message}", markup=False, highlight=False, emoji=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted", markup=False, emoji=False)
        return 130
    except click.ClickException as e:
        err_console.print(f"error: {' '.join(e.format_message().split())}", markup=False, highlight=False, emoji=False,
                          soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written", markup=False, emoji=False)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
