"""extract-lora --refine-steps: the extracted factors refined end to end against the tuned model.

Builds the two models the refinement needs (:mod:`compress.lowrank.refine`): the student is the base (for a
QA-LoRA adapter, the quantized base it will be folded into) with every fixed part of the adapter applied (tensors
kept whole, bias deltas), the teacher the tuned model; runs the refinement on the calibration samples; writes the
refined factors back and re-measures each module's weight error.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.inputs import open_model
from compress.lowrank.refine import Factors, RefineOptions, refine_factors
from compress.merge.lora import QALORA_POOLING
from compress.pipeline.extract_report import ExtractReport
from compress.pipeline.report import human_bytes
from compress.pipeline.run import RunOptions

# Two float32 models, their gradients' activations and Adam's state: the models dominate.
MODEL_COPIES = 2.5


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(reader: Any, device: torch.device) -> None:
    """One line and exit 2 before loading when the base and tuned models in float32 cannot fit in memory."""
    if device.type != "cpu":
        return  # the device's own allocator reports; its memory is not the host's
    params = sum(math.prod(info.shape) for info in reader.infos())
    need = int(params * 4 * MODEL_COPIES)
    have = available_memory()
    if have is not None and need > have:
        raise InputError(f"--refine-steps holds the base and the tuned model in float32 (about {human_bytes(need)}), "
                         f"but only {human_bytes(have)} of memory is available",
                         fix="Drop --refine-steps (the SVD factors need no more than one tensor at a time), or run on "
                             "a machine with more memory (--device cuda).")


def _is_causal_lm(config: dict[str, Any] | None) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (config or {}).get("architectures") or [])


def refine_extracted(base_path: Path, tuned_path: Path, quantized_path: Path | None, tensors: dict[str, dict[str, Any]],
                     report: ExtractReport, tokens: torch.Tensor, options: RefineOptions, *, seed: int,
                     qalora_group_size: int | None, run: RunOptions) -> dict[str, Any]:
    """Refine every LoRA factor pair in ``tensors`` (entry name -> parts, as the extraction tasks wrote them) in
    place; update ``report``'s rows and notes; return what provenance records. ``tokens`` [n, L]: the calibration
    samples."""
    from compress.evaluation import transformers_model
    from compress.pipeline.calibrated import torch_threads
    from compress.pipeline.execute import available_cores

    with open_model(base_path) as base:
        if not _is_causal_lm(base.config):
            raise InputError("--refine-steps distils next-token predictions, but the base is not a causal LM "
                             f"(architectures: {(base.config or {}).get('architectures')})",
                             where=str(base_path), fix="Drop --refine-steps for this model.")
        check_memory(base, run.device)
    device = run.device
    run.stage("refinement: loading the base and the tuned model")
    with open_model(quantized_path or base_path) as reader:
        student = transformers_model(reader, dtype=torch.float32)
    with open_model(tuned_path) as reader:
        teacher = transformers_model(reader, dtype=torch.float32)
    student_params, teacher_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    modules = dict(student.named_modules())
    factors: dict[str, Factors] = {}
    with torch.no_grad():
        for name, parts in tensors.items():
            module = name.rsplit(".", 1)[0]
            if "A" in parts:
                layer = modules[module]
                embedding = isinstance(layer, torch.nn.Embedding)
                group = None if embedding else qalora_group_size
                pooling = QALORA_POOLING["peft"](layer.weight.shape[1], group) if group else 1.0
                factors[module] = Factors(parts["A"], parts["B"], group, pooling, embedding)
            elif "bias" in parts:  # a bias delta rides on its module's LoRA (lora_B.bias)
                if "A" in tensors.get(module + ".weight", {}):
                    modules[module].bias.add_(parts["bias"].to(torch.float32))
            elif "weight" in parts or "whole" in parts:  # kept whole: the student holds the tuned values
                student_params[name].copy_(teacher_params[name])
    student.to(device)
    teacher.to(device)
    threads = available_cores()
    with torch_threads(threads):
        refined, result = refine_factors(
            student, teacher, factors, tokens.to(device), options, seed=seed,
            progress=lambda step, kl: run.stage(f"refinement step {step}/{options.steps}: KL {kl:.2e}"))
    if result.kept:
        for name, parts in tensors.items():
            module = name.rsplit(".", 1)[0]
            if "A" in parts:
                parts["A"], parts["B"] = refined[module].A, refined[module].B
        errors = weight_errors(student_params, teacher_params, refined)
        report.rows = [replace(r, rel_error=errors[r.module], output_error=None) if r.module in errors else r
                       for r in report.rows]
        report.notes.append(
            f"refined over {result.steps} steps on {result.train_samples} calibration samples: KL(tuned || base + "
            f"adapter) on {result.heldout_samples} held-out samples {result.kl_before:.4g} -> {result.kl_after:.4g} "
            "nats per token; weight errors are of the refined factors (output errors of the SVD no longer apply)")
    else:
        report.notes.append(
            f"refinement did not lower the KL on {result.heldout_samples} held-out calibration samples "
            f"({result.kl_before:.4g} -> {result.kl_after:.4g} nats per token over {result.steps} steps): the SVD "
            "factors were kept (try a smaller --refine-lr or more calibration text)")
    report.refinement = result.as_dict() | {"lr": options.lr, "batch": options.batch}
    del student, teacher
    return report.refinement


@torch.no_grad()
def weight_errors(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], factors: dict[str, Factors]
                  ) -> dict[str, float]:
    """||dW - update||_F / ||dW||_F per module, dW = tuned - base weight (the embedding's transposed, as PEFT's
    embedding update is (B A)^T), the update expanded over QA-LoRA groups."""
    errors = {}
    for module, f in factors.items():
        dW = (tuned[module + ".weight"] - base[module + ".weight"]).float().cpu()
        if f.embedding:
            dW = dW.T
        update = f.B.float() @ f.A.float()
        if f.group is not None:
            update = update.repeat_interleave(f.group, dim=1) * f.pooling
        norm = float(dW.norm())
        errors[module] = float((dW - update).norm()) / norm if norm > 0 else 0.0
    return errors
