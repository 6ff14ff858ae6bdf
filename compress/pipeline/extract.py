"""extract-lora: a PEFT LoRA adapter from a base and a fine-tuned checkpoint, by truncated SVD of
each weight delta dW = W_tuned - W_base (float32), streamed one tensor pair at a time.

Plan first (which tensors become LoRA factors, which are copied whole, which are skipped and why),
then execute; every skipped change is reported, never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.inputs import open_model
from compress.formats.output import check_output, write_json
from compress.formats.peft_adapter import AdapterModule, AdapterSink, AdapterSpec
from compress.formats.sink import decode, encode
from compress.lowrank.svd import RankRule, low_rank, pick_engine
from compress.metrics import frobenius_norm
from compress.pipeline.execute import execute
from compress.pipeline.extract_report import Dropped, ExtractReport, ModuleRow, Unchanged
from compress.pipeline.plan import EMBEDDING_PATTERN, HEAD_PATTERN, compile_regex, default_choice
from compress.pipeline.run import RunOptions, json_safe, write_provenance
from compress.pipeline.tasks import ModelSource, Task, TaskContext, TaskResult

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


@dataclass(frozen=True)
class ExtractDelta(Task):
    """One tensor pair: the delta's factors (``A``, ``B``), the tuned tensor whole (``full``), the bias delta
    (``bias``), or only its size when it is not extracted; rows say what happened."""

    entry: PairPlan
    options: ExtractOptions

    def run(self, ctx: TaskContext) -> TaskResult:
        entry, options, rule = self.entry, self.options, self.options.rule
        W_base = ctx.read("base", entry.name).to(ctx.device)
        W_tuned = ctx.read("tuned", entry.name).to(ctx.device)
        base_norm = frobenius_norm(W_base)
        dW = W_tuned.to(torch.float32, copy=True).sub_(W_base)  # the values of W_tuned.float() - W_base.float()
        del W_base
        if entry.action != "full":
            del W_tuned  # only a full copy needs it; the SVD's memory is the delta's
        # A NaN or inf anywhere makes the float64 sum of squares non-finite (finite float32 squares cannot
        # overflow it), so the norm doubles as the finiteness check without another pass.
        delta_norm = frobenius_norm(dW)
        if not math.isfinite(delta_norm):
            raise InputError(f"the delta of '{entry.name}' has non-finite values (NaN or inf)",
                             fix="One of the checkpoints is damaged; check both with `compress inspect`.")
        delta_rel = delta_norm / base_norm if base_norm > 0 else (0.0 if delta_norm == 0 else math.inf)
        module = entry.name.rsplit(".", 1)[0]
        if delta_norm == 0:
            return TaskResult([], [Unchanged(entry.name)])
        if entry.action == "check":
            return TaskResult([], [Dropped(entry.name, entry.reason, delta_rel)])
        if entry.action == "bias":
            row = ModuleRow(entry.name, entry.shape, "bias", 0, 1.0, 0.0, 0.0, delta_rel, dW.numel(), "-")
            return TaskResult([(f"{entry.name}:bias", encode(dW.to("cpu", options.dtype)))], [row])
        if entry.action == "full":
            row = ModuleRow(module, entry.shape, "full", 0, 1.0, 0.0, 0.0, delta_rel, W_tuned.numel(), "-")
            return TaskResult([(f"{entry.name}:weight", encode(W_tuned.to("cpu")))], [row])
        embedding = entry.action == "embedding-lora"
        target = dW.T if embedding else dW  # PEFT's embedding delta is (B @ A)^T
        lr = low_rank(target, rule, engine=options.engine, oversample=options.oversample, n_iter=options.n_iter,
                      seed=options.seed, total_energy=delta_norm**2)
        residual = frobenius_norm(torch.addmm(target, lr.B, lr.A, alpha=-1))
        row = ModuleRow(module, entry.shape, "embedding-lora" if embedding else "lora", lr.rank, lr.retained_energy,
                        residual / delta_norm, lr.eckart_young_rel_error, delta_rel, lr.A.numel() + lr.B.numel(),
                        lr.engine)
        factors = [(f"{entry.name}:A", encode(lr.A.to("cpu", options.dtype))),
                   (f"{entry.name}:B", encode(lr.B.to("cpu", options.dtype)))]
        return TaskResult(factors, [row])


class FactorCollector:
    """Where the executor puts an extraction's tensors (small: rank-r factors), keyed ``ENTRY:PART``, until every
    rank is known and the adapter is written."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def write(self, key: str, tensor: Any) -> None:
        entry, _, part = key.rpartition(":")
        self.tensors.setdefault(entry, {})[part] = decode(tensor)


def extraction_tasks(plan: ExtractPlan, options: ExtractOptions) -> list[ExtractDelta]:
    return [ExtractDelta(e.name, math.prod(e.shape) * 4, e, options) for e in plan.entries if e.action != "skip"]


def build_adapter(plan: ExtractPlan, report: ExtractReport, tensors: dict[str, dict[str, torch.Tensor]],
                  base: CheckpointReader, options: ExtractOptions, base_name: str | None) -> AdapterSpec:
    """The adapter from every task's tensors (``tensors[entry name]``), after the rules that need all rows:
    rank-0 modules are left out, bias deltas ride on their module's LoRA or are reported as dropped."""
    rule = options.rule
    modules: dict[str, AdapterModule] = {}
    biases: dict[str, tuple[torch.Tensor, float]] = {}  # module -> (bias delta, ||db|| / ||b||)
    rows = {r.module: r for r in report.rows}
    for entry in plan.entries:
        parts = tensors.get(entry.name)
        if not parts:
            continue
        module = entry.name.rsplit(".", 1)[0]
        if "bias" in parts:
            biases[module] = (parts["bias"], rows[entry.name].delta_rel)
        elif "weight" in parts:
            modules[module] = AdapterModule(module, "full", weight=parts["weight"])
        else:
            kind = "embedding" if entry.action == "embedding-lora" else "linear"
            modules[module] = AdapterModule(module, kind, A=parts["A"], B=parts["B"])
    report.delta_bytes = sum(math.prod(r.shape) * 4 for r in report.rows if r.kind in ("lora", "embedding-lora"))
    capped = sum(1 for e in plan.entries if e.action in ("lora", "embedding-lora") and e.name in tensors
                 and rule.rank is not None and rule.rank > min(e.shape))
    zero_rank = [r for r in report.rows if r.kind in ("lora", "embedding-lora") and r.rank == 0]
    for row in zero_rank:  # nothing to write: no singular value qualified under the rule
        modules.pop(row.module, None)
        report.dropped.append(Dropped(row.module + ".weight", "rank 0 under the rank rule", row.delta_rel))
    if zero_rank:
        report.notes.append(f"{len(zero_rank)} modules kept rank 0 under the rule (no singular value qualified) and "
                            "were left out of the adapter")
        report.rows = [r for r in report.rows if r not in zero_rank]
    # Biases travel on their module's LoRA (lora_B.bias); without one, PEFT has nowhere to put them.
    for module, (bias, delta_rel) in biases.items():
        if module in modules and modules[module].kind == "linear":
            modules[module].bias = bias
            continue
        weight_row = next((d for d in report.dropped if d.name == module + ".weight"), None)
        rank_zero = weight_row is not None and weight_row.reason.startswith("rank 0")
        reason = "its weight kept rank 0 under the rank rule" if rank_zero else "bias changed but its weight did not"
        report.dropped.append(Dropped(module + ".bias", reason, delta_rel))
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
    return spec


@dataclass(frozen=True)
class ExtractRequest:
    base: Path
    tuned: Path
    out: Path | None
    options: ExtractOptions
    force: bool = False


def dry_run_extract(request: ExtractRequest) -> ExtractPlan:
    with open_model(request.base) as base, open_model(request.tuned) as tuned:
        return plan_extraction(base, tuned, request.options)


def extract_lora(request: ExtractRequest, run: RunOptions) -> ExtractReport:
    """Extract the adapter into ``request.out`` (with its report and provenance); returns the report."""
    out, options = request.out, request.options
    assert out is not None
    check_output(out, force=request.force, inputs=[request.base, request.tuned])
    with open_model(request.base) as base, open_model(request.tuned) as tuned:
        plan = plan_extraction(base, tuned, options)
        rule = options.rule
        report = ExtractReport(rule={k: v for k, v in vars(rule).items() if v is not None} | {"svd": options.engine},
                               notes=list(plan.notes))
        tasks = extraction_tasks(plan, options)
        factors = FactorCollector()
        run.start("extract-lora", sum(t.nbytes for t in tasks), len(tasks))
        with AdapterSink(out, force=request.force) as sink:
            stats = execute(tasks, factors, report.add, sources={"base": ModelSource(str(request.base)),
                                                         "tuned": ModelSource(str(request.tuned))},
                    opened={"base": base, "tuned": tuned}, device=run.device, options=run.executor,
                    progress=run.on_task)
            spec = build_adapter(plan, report, factors.tensors, base, options, str(request.base))
            if not spec.modules:
                raise InputError("the tuned model does not differ from the base in any extractable module",
                                 fix="Check that --tuned is really the fine-tuned model, or widen --targets.")
            sink.write_adapter(spec)
            write_json(sink.folder / "report.json", json_safe(report.as_dict()))
            (sink.folder / "report.md").write_text(report.to_markdown(), encoding="utf-8")
            write_provenance(sink.folder / "compress_provenance.json", run, "extract-lora", request.tuned, out,
                             {"base": str(request.base.resolve()), "rule": report.rule, "targets": options.targets,
                              "embeddings": options.embeddings, "dtype": str(options.dtype).removeprefix("torch."),
                              "seed": options.seed, "execution": stats.as_dict()})
            sink.commit()
    return report
