"""Execute a plan: stream tensors from a reader through a quantizer into a format writer.

One input tensor is alive at a time (plus its quantized form), so peak memory is bounded by the
largest tensor, not by the model. This is the only module that drives progress display, through
an optional callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader
from compress.formats.writer import ShardedWriter, write_json
from compress.metrics import compare
from compress.pipeline.plan import Plan
from compress.pipeline.report import KeptRow, QuantizeReport, TensorRow
from compress.quant import METHODS, config_to_dict
from compress.quant.int4 import Int4Config
from compress.quant.nf4 import NF4Config

Progress = Callable[[str, int], None]  # (tensor name, bytes just processed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU. Asking for an absent CUDA is an option error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was asked for but no CUDA device is available",
                          fix="Use --device cpu or --device auto.")
    if name not in ("cpu", "cuda"):
        raise OptionError(f"--device {name!r} is not one of auto, cpu, cuda", fix="Pick one of those.")
    return torch.device(name)


def plan_notes(plan: Plan) -> list[str]:
    """Facts about the layout a user should know before shipping it."""
    notes: list[str] = []
    cfg = plan.config
    if isinstance(cfg, Int4Config):
        partial = [e for e in plan.quantized if e.info.shape[1] % cfg.group_size]
        if partial:
            ins = sorted({e.info.shape[1] for e in partial})
            notes.append(
                f"{len(partial)} layers have an input size ({', '.join(map(str, ins))}) that is not a multiple of "
                f"the group size {cfg.group_size}: their last group is shorter (n_groups = ceil(in / "
                f"{cfg.group_size}), expressed through g_idx). Kernels that require in % group_size == 0 "
                "(exllama, marlin) fall back to slower paths or refuse them; --group-size 32 or 64 avoids it.")
    if isinstance(cfg, NF4Config):
        odd = [e for e in plan.quantized if e.info.shape[1] % cfg.block_size]
        if odd:
            notes.append(
                f"{len(odd)} layers have an input size that is not a multiple of the block size {cfg.block_size}, "
                "so blocks span rows. The layout is valid (bitsandbytes' own quantize_4bit produces it), but "
                "bitsandbytes 0.50's CPU dequantize kernel reconstructs such layers wrongly; CUDA is unaffected. "
                "For CPU inference with bitsandbytes pick a block size that divides every input size.")
    kept_linear = [e for e in plan.kept if e.reason.startswith("kept:")]
    if kept_linear:
        notes.append(f"{len(kept_linear)} Linear weights were kept in float because the format cannot hold them "
                     f"(first: {kept_linear[0].info.name}: {kept_linear[0].reason}).")
    return notes


def execute(plan: Plan, reader: CheckpointReader, out_dir: Path, *, device: torch.device,
            shard_bytes: int, progress: Progress | None = None) -> QuantizeReport:
    """Quantize and write every tensor of ``plan`` into ``out_dir`` (an empty temporary folder);
    write config.json, the copied non-weight files, report.json and report.md. Returns the report."""
    method = METHODS[plan.method]
    fmt = plan.format
    report = QuantizeReport(method=plan.method, parameters=config_to_dict(plan.config), format=fmt.name,
                            bytes_before=plan.input_bytes, bytes_after=plan.output_bytes, notes=plan_notes(plan))
    writer = ShardedWriter(out_dir, plan.output_specs(), shard_bytes)
    try:
        for entry in plan.entries:
            info = entry.info
            tensor = reader.get(info.name)
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise InputError(f"tensor '{info.name}' read as {tuple(tensor.shape)} {tensor.dtype}, header says "
                                 f"{info.shape} {info.dtype}", where=str(info.file), fix="The file is corrupt.")
            if entry.quantize:
                W = tensor.to(device)
                if not bool(torch.isfinite(W).all()):
                    bad = int((~torch.isfinite(W)).sum())
                    raise InputError(f"tensor '{info.name}' has {bad} non-finite values (NaN or inf)",
                                     where=str(info.file),
                                     fix="The checkpoint is damaged; fix it, or --exclude this tensor to keep "
                                         "it as is.")
                qt = method.quantize(W, plan.config)
                metrics = compare(W, qt.dequantize(torch.float32))
                packed = fmt.pack(info.name, qt.to("cpu"))
                for spec in entry.outputs:
                    writer.write(spec.name, packed[spec.name])
                report.quantized.append(TensorRow(info.name, info.shape, dtype_name(info.dtype),
                                                  qt.bits_per_weight, metrics))
                del W, qt, packed
            else:
                writer.write(info.name, tensor)
                report.kept.append(KeptRow(info.name, info.shape, dtype_name(info.dtype), entry.reason))
            del tensor
            if progress is not None:
                progress(info.name, info.nbytes)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return report


def write_sidecar_files(out_dir: Path, plan: Plan, reader: CheckpointReader, report: QuantizeReport) -> None:
    """config.json with quantization_config, the source's non-weight files, report.json/.md."""
    config = dict(reader.config) if reader.config else None
    if config is not None:
        config.pop("quantization_config", None)
        dtype = _model_dtype(config, plan)
        config["quantization_config"] = plan.format.quantization_config(
            plan.config, dtype, plan.kept_linear_modules(), [e.info.name for e in plan.quantized])
        write_json(out_dir / "config.json", config)
    else:
        report.notes.append("the input has no config.json, so the output has none either: loaders that need "
                            "one (transformers) cannot open it until you add it")
    for name, source in reader.extra_files().items():
        target = out_dir / name
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            target.write_bytes(Path(source).read_bytes())
    if not reader.extra_files() and isinstance(reader.config, dict) and reader.path.suffix == ".gguf":
        report.notes.append("no tokenizer files were written (install transformers to convert the GGUF tokenizer)")
    write_json(out_dir / "report.json", json_safe(report.as_dict()))
    (out_dir / "report.md").write_text(report.to_markdown(), encoding="utf-8")


def _model_dtype(config: dict[str, Any], plan: Plan) -> torch.dtype:
    from compress.formats.quantized import model_dtype

    fallback = plan.quantized[0].info.dtype if plan.quantized else torch.float32
    return model_dtype(config, fallback)


def json_safe(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings so report.json stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
