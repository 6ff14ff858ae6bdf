"""extract-lora: a PEFT LoRA adapter from a base and a fine-tuned checkpoint, by truncated SVD of
each weight delta dW = W_tuned - W_base (float32), streamed one tensor pair at a time.

Plan first (which tensors become LoRA factors, which are copied whole, which are skipped and why),
then execute; every skipped change is reported, never silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from compress.calib.text import CalibrationOptions
from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.inputs import open_model
from compress.formats.output import check_output, write_json
from compress.formats.peft_adapter import AdapterModule, AdapterSink, AdapterSpec
from compress.formats.quantized import DequantizingReader
from compress.formats.sink import decode, encode
from compress.lowrank.refine import RefineOptions
from compress.lowrank.svd import (
    LowRank,
    RankRule,
    activation_scaling,
    allocate_ranks,
    error_curves,
    grouped_error_curves,
    low_rank,
    low_rank_grouped,
    low_rank_whitened,
    pick_engine,
    whitening_factor,
)
from compress.merge.lora import QALORA_POOLING
from compress.metrics import frobenius_norm
from compress.pipeline.execute import Executor, available_cores
from compress.pipeline.extract_report import Dropped, ExtractReport, ModuleRow, Unchanged
from compress.pipeline.plan import EMBEDDING_PATTERN, HEAD_PATTERN, compile_regex, default_choice
from compress.pipeline.report import human_bytes
from compress.pipeline.run import RunOptions, json_safe, write_provenance
from compress.pipeline.tasks import ModelSource, Task, TaskContext, TaskResult

EMBEDDING_MODES = ("skip", "lora", "full")
AWARE_MODES = ("diagonal", "whitened")


@dataclass(frozen=True)
class Budget:
    """One size for all LoRA factors together: ``bytes`` (--budget) or the size of ``mean_rank`` everywhere
    (--mean-rank); ranks are then allocated across modules (:func:`~compress.lowrank.svd.allocate_ranks`)."""

    bytes: int | None = None
    mean_rank: int | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.mean_rank is None):
            raise ValueError("give one of --budget or --mean-rank")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"the budget must be positive, got {self.bytes} bytes")
        if self.mean_rank is not None and self.mean_rank < 1:
            raise ValueError(f"--mean-rank must be at least 1, got {self.mean_rank}")

    def parameters(self, costs: dict[str, int], itemsize: int) -> int:
        """The budget in stored factor parameters for modules whose one rank costs ``costs[m]`` parameters."""
        if self.mean_rank is not None:
            return sum(self.mean_rank * c for c in costs.values())
        assert self.bytes is not None
        return self.bytes // itemsize

    def describe(self) -> str:
        return f"mean rank {self.mean_rank}" if self.mean_rank is not None else f"budget {human_bytes(self.bytes or 0)}"


@dataclass(frozen=True)
class ExtractOptions:
    """How to turn deltas into an adapter. ``calibration``: activation-aware SVD on the base model's inputs of
    each module (dampening ``damp``); ``budget``: ranks allocated across modules under one size (``rule`` then
    only caps each module, at its ``max_rank``)."""

    rule: RankRule
    engine: str = "auto"
    targets: str = "all-linear"  # or a regex searched in weight names
    embeddings: str = "skip"  # embeddings and lm_head: skip, lora, or full (modules_to_save)
    dtype: torch.dtype = torch.float32  # dtype of the saved factors
    seed: int = 0
    oversample: int = 16
    n_iter: int = 6
    calibration: CalibrationOptions | None = None
    damp: float = 0.01
    budget: Budget | None = None
    # with calibration: "diagonal" (ASVD: columns scaled by activation rms^0.5) or "whitened" (SVD of dW L, the
    # output error on the calibration inputs). On SmolLM2's real fine-tune full whitening kept less of the held-out
    # improvement than plain SVD (rank 8: 0.716 against 0.758), the diagonal scaling a little more (0.763).
    aware: str = "diagonal"
    # Small changed tensors of modules that are not LoRA targets (norm weights, their biases) are kept whole in
    # modules_to_save, as mergekit keeps them: PEFT loads them. lora_only leaves them out (vLLM accepts LoRA only).
    lora_only: bool = False
    # QA-LoRA form: lora_A sees the inputs pooled over groups of this many channels, so the update is constant inside
    # each quantization group of the --quantized-base it is extracted against and folds into its zero points.
    qalora_group_size: int | None = None
    # --refine-steps: the factors refined end to end against the tuned model on the calibration text
    refine: RefineOptions | None = None

    def __post_init__(self) -> None:
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {self.embeddings!r}")
        pick_engine(self.engine, (1, 1), 1)  # validates the name
        if not 0 < self.damp < 1:
            raise ValueError(f"dampening must be in (0, 1), got {self.damp}")
        if self.aware not in AWARE_MODES:
            raise ValueError(f"--aware must be one of {', '.join(AWARE_MODES)}, got {self.aware!r}")
        if self.qalora_group_size is not None:
            if self.qalora_group_size < 1:
                raise ValueError(f"--qalora-group-size must be positive, got {self.qalora_group_size}")
            if self.embeddings == "lora":
                raise ValueError("QA-LoRA adapters have Linear modules only; use --embeddings skip or full with "
                                 "--quantized-base")
        if self.refine is not None and self.calibration is None:
            raise ValueError("--refine-steps needs --calibration FILE|default: the text the factors are refined on "
                             "(the fine-tune's own training text works best)")
        if self.lora_only and self.embeddings == "full":
            raise ValueError("--lora-only writes LoRA factors only, but --embeddings full saves whole tensors; "
                             "use --embeddings lora or skip")

    @property
    def task_rule(self) -> RankRule:
        """The rule each module's task applies: with a budget, every rank up to the cap (trimmed afterwards)."""
        return RankRule(rank=self.rule.max_rank, max_rank=self.rule.max_rank) if self.budget else self.rule


@dataclass(frozen=True)
class PairPlan:
    """What happens to one tensor present in both checkpoints."""

    name: str
    shape: tuple[int, ...]
    action: str  # lora | embedding-lora | full | whole | bias | check (reported if changed) | skip
    reason: str


@dataclass
class ExtractPlan:
    entries: list[PairPlan] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def max_adapter_params(self, rule: RankRule, group_size: int | None = None) -> int:
        total = 0
        for e in self.entries:
            if e.action in ("lora", "embedding-lora"):
                n_in = e.shape[1] // group_size if group_size else e.shape[1]
                r = rule.upper_bound((e.shape[0], n_in))
                total += r * (e.shape[0] + n_in)
            elif e.action in ("full", "whole", "bias"):
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
        elif len(t.shape) <= 1 and not embedding_like:
            # Norm weights and other vectors: a few KiB, no LoRA can carry them, PEFT takes them whole.
            plan.entries.append(PairPlan(name, t.shape, "check", "vector (--lora-only)") if options.lora_only else
                                PairPlan(name, t.shape, "whole", "vector kept whole if changed (modules_to_save)"))
        else:
            plan.entries.append(PairPlan(name, t.shape, "check", "not a weight matrix"))
    # Bias deltas of target modules travel with the adapter (lora_bias); others are only checked.
    for i, e in enumerate(plan.entries):
        if e.action in ("check", "whole") and e.name.endswith(".bias") \
                and e.name.removesuffix(".bias") in target_modules:
            plan.entries[i] = (PairPlan(e.name, e.shape, "check", "bias of a QA-LoRA module (PEFT's QA-LoRA has none)")
                               if options.qalora_group_size else
                               PairPlan(e.name, e.shape, "bias", "bias of a target module (lora_bias)"))
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
    S: torch.Tensor | None = None  # the second moment X^T X / n [in, in] of the module's calibration inputs

    def run(self, ctx: TaskContext) -> TaskResult:
        entry, options, rule = self.entry, self.options, self.options.task_rule
        W_base = ctx.read("base", entry.name).to(ctx.device)
        W_tuned = ctx.read("tuned", entry.name).to(ctx.device)
        base_norm = frobenius_norm(W_base)
        group = options.qalora_group_size if entry.action == "lora" else None
        if group is not None:  # QA-LoRA: the delta from the quantized base the adapter will be folded into
            W_base = quantized_reference(ctx.reader("quantized"), entry.name, W_base, group).to(ctx.device)
        dW = W_tuned.to(torch.float32, copy=True).sub_(W_base)  # the values of W_tuned.float() - W_base.float()
        del W_base
        if entry.action not in ("full", "whole"):
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
        if entry.action in ("full", "whole"):  # a module's weight (modules_to_save), or one of its vectors
            full = entry.action == "full"
            row = ModuleRow(module if full else entry.name, entry.shape, "full", 0, 1.0, 0.0, 0.0, delta_rel,
                            W_tuned.numel(), "-")
            return TaskResult([(f"{entry.name}:{'weight' if full else 'whole'}", encode(W_tuned.to("cpu")))], [row])
        embedding = entry.action == "embedding-lora"
        target = dW.T if embedding else dW  # PEFT's embedding delta is (B @ A)^T
        S = None if embedding or self.S is None else self.S.to(ctx.device)
        if group is not None:
            lr, residual, (weight_curve, output_curve), A = self._grouped_factors(target, group, S)
        else:
            if S is not None:  # activation-aware: the error of the module's output on the calibration inputs
                L = whitening_factor(S, options.damp) if options.aware == "whitened" else activation_scaling(S)
                lr = low_rank_whitened(target, L, rule, engine=options.engine, oversample=options.oversample,
                                       n_iter=options.n_iter, seed=options.seed)
            else:
                lr = low_rank(target, rule, engine=options.engine, oversample=options.oversample,
                              n_iter=options.n_iter, seed=options.seed, total_energy=delta_norm**2)
            residual = frobenius_norm(torch.addmm(target, lr.B, lr.A, alpha=-1))
            weight_curve, output_curve = error_curves(target, lr, S) if lr.rank else ([], None)
            A = lr.A
        row = ModuleRow(module, entry.shape, "embedding-lora" if embedding else "lora", lr.rank, lr.retained_energy,
                        residual / delta_norm, lr.eckart_young_rel_error, delta_rel, lr.A.numel() + lr.B.numel(),
                        lr.engine, output_error=output_curve[-1] if output_curve else None,
                        **({"spectrum": lr.singular_values.cpu(), "total_energy": lr.total_energy,
                            "weight_curve": weight_curve, "output_curve": output_curve} if options.budget else {}))
        factors = [(f"{entry.name}:A", encode(A.to("cpu", options.dtype))),
                   (f"{entry.name}:B", encode(lr.B.to("cpu", options.dtype)))]
        return TaskResult(factors, [row])

    def _grouped_factors(self, dW: torch.Tensor, group: int, S: torch.Tensor | None
                         ) -> tuple[LowRank, float, tuple[list[float], list[float] | None], torch.Tensor]:
        """QA-LoRA factors: B A ~ M [out, in/g], the update constant inside each group of g input channels
        (:func:`~compress.lowrank.svd.low_rank_grouped`), with the residual ||dW - expand(B A)||, the error curves and
        lora_A as stored: divided by PEFT's pooling factor, so that PEFT's QA-LoRA forward (group mean times in/g)
        applies exactly expand(B A)."""
        options = self.options
        lr = low_rank_grouped(dW, group, options.task_rule, S=S, aware=options.aware, damp=options.damp,
                              engine=options.engine, oversample=options.oversample, n_iter=options.n_iter,
                              seed=options.seed)
        expanded = (lr.B @ lr.A).repeat_interleave(group, dim=1)
        residual = frobenius_norm(dW - expanded)
        del expanded
        curves = grouped_error_curves(dW, lr, group, S) if lr.rank else ([], None)
        return lr, residual, curves, lr.A / QALORA_POOLING["peft"](dW.shape[1], group)


# A 4-bit grid's rounding moves a weight by well under half its norm (RTN INT4: ~10%); another model's weights
# differ by about sqrt(2) of it.
FOREIGN_BASE_REL = 0.5


def quantized_reference(reader: CheckpointReader, name: str, W_base: torch.Tensor, group: int) -> torch.Tensor:
    """Weight ``name`` of the --quantized-base, dequantized (float32), after checking that it can take a QA-LoRA
    update of group size ``group`` (group-wise INT4 with consecutive groups dividing ``group``; a weight the base
    keeps in float takes any update) and that it is a quantization of ``W_base``."""
    where = str(reader.path)
    if isinstance(reader, DequantizingReader) and reader.is_quantized(name):
        qt = reader.quantized(name)
        group_size = getattr(qt, "group_size", None)
        if group_size is None:
            raise InputError(f"'{name}' is stored as {type(qt).__name__} in the quantized base; a QA-LoRA update "
                             "folds only into group-wise INT4 zero points", where=where,
                             fix="Quantize the base with --method int4 (gptq, compressed-tensors or native layout).")
        g_idx = getattr(qt, "g_idx", None)
        if g_idx is not None and not torch.equal(g_idx.cpu(), torch.arange(qt.shape[1]) // group_size):
            raise InputError(f"'{name}' has act-order groups (g_idx) in the quantized base; a QA-LoRA update is "
                             "constant over consecutive input channels and cannot fold into them", where=where,
                             fix="Quantize the base without --act-order.")
        if group % group_size:
            raise InputError(f"--qalora-group-size {group} is not a multiple of the quantized base's group size "
                             f"{group_size} ('{name}'): the update must be constant inside each quantization group to "
                             "fold", fix=f"Use --qalora-group-size {group_size} (or a multiple of it dividing every "
                                         "input size).")
        W_q = qt.dequantize(torch.float32)
    else:
        W_q = reader.get(name).float()
    if tuple(W_q.shape) != tuple(W_base.shape):
        raise InputError(f"'{name}' has shape {list(W_q.shape)} in the quantized base but {list(W_base.shape)} in "
                         "--base", where=where, fix="Give the quantization of --base itself as --quantized-base.")
    base_norm = frobenius_norm(W_base)
    rel = frobenius_norm(W_q - W_base.float()) / base_norm if base_norm > 0 else 0.0
    if rel > FOREIGN_BASE_REL:
        raise InputError(f"the quantized base is not a quantization of --base: '{name}' differs from it by "
                         f"{rel:.0%} (4-bit rounding moves a weight by about 10%)", where=where,
                         fix="Give the quantization of --base itself as --quantized-base.")
    return W_q


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
        module, leaf = entry.name.rsplit(".", 1)
        if "bias" in parts:
            biases[module] = (parts["bias"], rows[entry.name].delta_rel)
        elif "whole" in parts:
            kept = modules.setdefault(module, AdapterModule(module, "full", whole={}))
            assert kept.whole is not None
            kept.whole[leaf] = parts["whole"]
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
    whole = [m for m in modules.values() if m.kind == "full" and m.whole]
    if whole:
        size = sum(t.numel() * t.element_size() for m in whole for t in m.tensors().values())
        report.notes.append(f"{len(whole)} modules with changed vectors (norm weights, ...) kept whole in "
                            f"modules_to_save ({human_bytes(size)}; PEFT loads them, vLLM does not: --lora-only "
                            "leaves them out)")
    if capped:
        report.notes.append(f"--rank {rule.rank} exceeds the smaller side of {capped} matrices: their rank was capped "
                            "at min(out, in), which represents the delta exactly")
    all_names = sorted({n.rsplit(".", 1)[0] for n in (i.name for i in base.infos())})
    architectures = (base.config or {}).get("architectures") or []
    task = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
    spec = AdapterSpec(modules=[modules[m] for m in sorted(modules)], base_model_name_or_path=base_name,
                       task_type=task, all_module_names=all_names, qalora_group_size=options.qalora_group_size)
    report.adapter_bytes = sum(t.numel() * t.element_size() for t in spec.state_dict().values())
    return spec


@dataclass(frozen=True)
class ExtractRequest:
    base: Path
    tuned: Path
    out: Path | None
    options: ExtractOptions
    force: bool = False
    quantized_base: Path | None = None  # with options.qalora_group_size: the INT4 model the adapter folds into


def dry_run_extract(request: ExtractRequest) -> ExtractPlan:
    with open_model(request.base) as base, open_model(request.tuned) as tuned:
        plan = plan_extraction(base, tuned, request.options)
        if request.quantized_base is not None:
            with open_model(request.quantized_base) as quantized:
                check_quantized_base(plan, base, quantized, request.options)
        return plan


def quantized_group_size(path: Path) -> int:
    """The group size of the first group-wise quantized weight of checkpoint ``path`` (--qalora-group-size's
    default)."""
    with open_model(path) as reader:
        if isinstance(reader, DequantizingReader):
            for info in reader.infos():
                if reader.is_quantized(info.name):
                    size = getattr(reader.quantized(info.name), "group_size", None)
                    if size is not None:
                        return int(size)
    raise InputError("--quantized-base has no group-wise INT4 weight", where=str(path),
                     fix="Give the INT4 model made from --base (compress quantize --method int4, or a GPTQ "
                         "checkpoint).")


def check_quantized_base(plan: ExtractPlan, base: CheckpointReader, quantized: CheckpointReader,
                         options: ExtractOptions) -> dict[str, Any]:
    """Whether --quantized-base can take this plan's QA-LoRA modules: same architecture, every target weight present
    with its shape, the group size dividing every input size. (Each weight's layout and closeness to the base are
    checked when it is read: :func:`quantized_reference`.) Returns what provenance records of it."""
    group = options.qalora_group_size
    assert group is not None
    where = str(quantized.path)
    if not isinstance(quantized, DequantizingReader):
        raise InputError("--quantized-base is not a quantized checkpoint (no group-wise INT4 weights found)",
                         where=where, fix="Give the INT4 model made from --base (compress quantize --method int4, "
                                          "or a GPTQ checkpoint).")
    base_type, q_type = (base.config or {}).get("model_type"), (quantized.config or {}).get("model_type")
    if base_type and q_type and base_type != q_type:
        raise InputError(f"--quantized-base is a '{q_type}' model but --base is a '{base_type}' model", where=where,
                         fix="Give the quantization of --base itself as --quantized-base.")
    infos = {i.name: i for i in quantized.infos()}
    targets = [e for e in plan.entries if e.action == "lora"]
    for e in targets:
        info = infos.get(e.name)
        if info is None:
            raise InputError(f"the quantized base has no tensor '{e.name}'", where=where,
                             fix="Give the quantization of --base itself as --quantized-base.")
        if tuple(info.shape) != tuple(e.shape):
            raise InputError(f"'{e.name}' has shape {list(info.shape)} in the quantized base but {list(e.shape)} in "
                             "--base", where=where, fix="Give the quantization of --base itself as --quantized-base.")
    if targets:  # the first weight's layout and closeness now, before a calibration pass; every one when read
        quantized_reference(quantized, targets[0].name, base.get(targets[0].name), group)
    sizes = sorted({e.shape[1] for e in targets})
    odd = [n for n in sizes if n % group]
    if odd:
        divisors = [d for d in range(1, min(sizes) + 1) if all(n % d == 0 for n in sizes)]
        raise InputError(f"--qalora-group-size {group} does not divide the input size {odd[0]} of the target modules",
                         fix=f"Use a group size dividing {', '.join(map(str, sizes))} (e.g. "
                             f"{', '.join(map(str, divisors[-3:]))}) that is a multiple of the base's group size.")
    fmt = getattr(quantized, "format", None)
    return {"path": str(Path(quantized.path).resolve()), "format": getattr(fmt, "name", None),
            "qalora_group_size": group}


def extract_lora(request: ExtractRequest, run: RunOptions) -> ExtractReport:
    """Extract the adapter into ``request.out`` (with its report and provenance); returns the report."""
    out, options = request.out, request.options
    assert out is not None
    inputs = [request.base, request.tuned] + ([request.quantized_base] if request.quantized_base else [])
    check_output(out, force=request.force, inputs=inputs)
    sources = {"base": ModelSource(str(request.base)), "tuned": ModelSource(str(request.tuned))}
    with open_model(request.base) as base, open_model(request.tuned) as tuned:
        plan = plan_extraction(base, tuned, options)
        quantized_base = None
        if request.quantized_base is not None:
            with open_model(request.quantized_base) as quantized:
                quantized_base = check_quantized_base(plan, base, quantized, options)
            sources["quantized"] = ModelSource(str(request.quantized_base))
        rule = options.rule
        report = ExtractReport(rule={k: v for k, v in vars(rule).items()
                                     if v is not None and not (options.budget and k == "rank")}
                               | {"svd": options.engine}
                               | ({"budget": options.budget.describe()} if options.budget else {})
                               | ({"calibration": f"activation-aware ({options.aware})"}
                                  if options.calibration else {})
                               | ({"qalora": f"group size {options.qalora_group_size}, against the quantized base"}
                                  if options.qalora_group_size else {})
                               | ({"refine": f"{options.refine.steps} steps, lr {options.refine.lr:g}"}
                                  if options.refine else {}),
                               notes=list(plan.notes))
        tasks = extraction_tasks(plan, options)
        factors = FactorCollector()
        calibration: dict[str, Any] | None = None
        run.start("extract-lora", sum(t.nbytes for t in tasks), len(tasks))
        with AdapterSink(out, force=request.force) as sink, \
                Executor(run.executor, sources=sources, opened={"base": base, "tuned": tuned},
                         device=run.device) as executor:
            if options.calibration is None:
                executor.run(tasks, factors, report.add, progress=run.on_task)
            else:
                tokens, text_sha256 = extraction_tokens(request)
                calibration = calibrated_extraction(request, base, tasks, executor, factors, report, run, tokens)
                calibration["sha256"] = text_sha256
            if options.budget is not None:
                apply_budget(report, factors.tensors, options)
            refinement = None
            if options.refine is not None:
                from compress.pipeline.extract_refine import refine_extracted

                refinement = refine_extracted(request.base, request.tuned, request.quantized_base, factors.tensors,
                                              report, tokens, options.refine, seed=options.seed,
                                              qalora_group_size=options.qalora_group_size, run=run)
            spec = build_adapter(plan, report, factors.tensors, base, options, str(request.base))
            if not spec.modules:
                raise InputError("the tuned model does not differ from the base in any extractable module",
                                 fix="Check that --tuned is really the fine-tuned model, or widen --targets.")
            sink.write_adapter(spec)
            write_json(sink.folder / "report.json", json_safe(report.as_dict()))
            (sink.folder / "report.md").write_text(report.to_markdown(), encoding="utf-8")
            if options.budget is not None:
                plot_ranks(report, sink.folder / "ranks.png")
            write_provenance(sink.folder / "compress_provenance.json", run, "extract-lora", request.tuned, out,
                             {"base": str(request.base.resolve()), "rule": report.rule, "targets": options.targets,
                              "embeddings": options.embeddings, "dtype": str(options.dtype).removeprefix("torch."),
                              "seed": options.seed, "calibration": calibration, "quantized_base": quantized_base,
                              "refinement": refinement,
                              "execution": executor.stats.as_dict()})
            sink.commit()
    return report


def extraction_tokens(request: ExtractRequest) -> tuple[torch.Tensor, str]:
    """The calibration samples [n, length] of ``request`` (the base's tokenizer, else the tuned model's: the same
    vocabulary) and the text's sha256."""
    from compress.calib.importance import calibration_tokens
    from compress.evaluation import tokenizer_dir

    assert request.options.calibration is not None
    model = request.base
    if tokenizer_dir(request.base, []) is None and tokenizer_dir(request.tuned, []) is not None:
        model = request.tuned
    return calibration_tokens(model, request.options.calibration, [])


def calibrated_extraction(request: ExtractRequest, base: CheckpointReader, tasks: list[ExtractDelta],
                          executor: Executor, factors: FactorCollector, report: ExtractReport,
                          run: RunOptions, tokens: torch.Tensor) -> dict[str, Any]:
    """Run ``tasks`` block by block with the second moment S = X^T X / n of each module's inputs in the *base*
    model on the calibration samples ``tokens`` [n, length] (the base's own block outputs feed the next block);
    returns what provenance records of the calibration."""
    from compress.calib.runner import CalibrationRunner
    from compress.pipeline.calibrated import block_of, torch_threads

    options = request.options
    assert options.calibration is not None
    threads = available_cores()  # the forward passes get every core, as in quantize --algorithm gptq
    with torch_threads(threads):
        runner = CalibrationRunner(base, tokens, run.device)
    stages: list[list[ExtractDelta]] = [[] for _ in range(runner.n_blocks + 1)]
    for task in tasks:
        stages[block_of(task.entry.name, runner) + 1].append(task)
    blocks = iter(runner)
    for index, stage in enumerate(stages):
        block = next(blocks) if index > 0 else None
        stats = {}
        if block is not None:
            run.stage(f"block {index}/{runner.n_blocks}: calibration statistics")
            with torch_threads(threads):
                stats = block.statistics()
        staged = [replace(t, S=stats[t.name].H / stats[t.name].rows) if t.entry.action == "lora" and t.name in stats
                  else t for t in stage]
        executor.run(staged, factors, report.add, progress=run.on_task)
        if block is not None:
            run.stage(f"block {index}/{runner.n_blocks}: outputs")
            with torch_threads(threads):
                block.finish({})  # the base model's own outputs
    return {**options.calibration.as_dict(), "aware": options.aware,
            **({"damp": options.damp} if options.aware == "whitened" else {"alpha": 0.5})}


def apply_budget(report: ExtractReport, tensors: dict[str, dict[str, torch.Tensor]], options: ExtractOptions) -> None:
    """Trim every LoRA module to the rank :func:`~compress.lowrank.svd.allocate_ranks` gives it under the budget
    (its factors and its report row alike)."""
    assert options.budget is not None
    rows = {r.module: r for r in report.rows if r.kind in ("lora", "embedding-lora") and r.rank > 0}
    if not rows:
        return
    group = options.qalora_group_size or 1  # a QA-LoRA lora_A is [r, in/g]
    costs = {m: r.shape[0] + r.shape[1] // group for m, r in rows.items()}
    itemsize = torch.empty(0, dtype=options.dtype).element_size()
    budget = options.budget.parameters(costs, itemsize)
    if options.budget.bytes is not None:  # whole tensors (bias deltas, full copies) are part of the size
        budget -= sum(r.params for r in report.rows if r.kind in ("full", "bias"))
    try:
        ranks = allocate_ranks({m: r.spectrum for m, r in rows.items()}, costs, budget,
                               {m: r.rank for m, r in rows.items()})
    except ValueError as e:
        floor = sum(costs.values()) * itemsize
        raise InputError(f"{e}: the budget cannot give each of the {len(rows)} modules rank 1",
                         fix=f"Raise --budget to at least {human_bytes(floor)} (or narrow --targets).") from e
    trimmed = {m: r.truncated(ranks[m]) for m, r in rows.items()}
    report.rows = [trimmed.get(r.module, r) for r in report.rows]
    for m, r in ranks.items():
        parts = tensors[m + ".weight"]
        parts["A"], parts["B"] = parts["A"][:r].contiguous(), parts["B"][:, :r].contiguous()
    spent = sum(costs[m] * r for m, r in ranks.items())
    report.notes.append(f"{options.budget.describe()}: {spent:,} factor parameters ({human_bytes(spent * itemsize)}) "
                        f"over {len(ranks)} modules, ranks {min(ranks.values())}-{max(ranks.values())} "
                        f"(mean {spent / sum(costs.values()):.1f} by size); ranks per module in ranks.png")


def plot_ranks(report: ExtractReport, path: Path) -> None:
    """ranks.png: the rank the budget gave each module (layers across, module names down); a note instead when
    matplotlib is not installed (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.notes.append("no ranks.png: matplotlib is not installed (pip install matplotlib)")
        return
    import re

    cells: dict[tuple[str, int], int] = {}
    for r in report.rows:
        if r.kind in ("lora", "embedding-lora"):
            m = re.search(r"\.(\d+)\.(.+)$", r.module)
            layer, kind = (int(m.group(1)), m.group(2)) if m else (-1, r.module)
            cells[(kind, layer)] = r.rank
    kinds = sorted({k for k, _ in cells})
    layers = sorted({la for _, la in cells})
    grid = [[cells.get((k, la), 0) for la in layers] for k in kinds]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * len(layers) + 2.5), 0.35 * len(kinds) + 1.4))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
    ax.set_xticks(range(len(layers)), [str(la) for la in layers], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_title(f"rank per module ({report.rule.get('budget', '')})", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
