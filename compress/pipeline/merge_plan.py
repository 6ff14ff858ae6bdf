"""The plan of a merge: which base tensors each adapter changes, checked before any weight is read.

:func:`plan_merge` matches every adapter module against the base's tensors (PEFT naming: adapter keys
``base_model.model.<module>.lora_A.weight`` adapt the base tensor ``<module>.weight``) and fails with the
module's name when one is missing or its shape disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from compress.errors import InputError, OptionError
from compress.formats.base import dtype_name
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.peft_adapter import LoraAdapter
from compress.merge.combine import CombineMethod, SumMethod
from compress.merge.lora import QALORA_POOLING, LoraModule


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
