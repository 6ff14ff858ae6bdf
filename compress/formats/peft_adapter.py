"""PEFT LoRA adapters on disk, read and written exactly as PEFT defines them (shared/reference/formats.md,
section 5): ``adapter_config.json`` + ``adapter_model.safetensors``.

This module is longer than most (~550 lines) for a reason: the issue that shaped the code asks for the whole
PEFT layout, read and write, in one module, and PEFT's config semantics (target matching, rank/alpha
patterns, variants it cannot merge) are most of it.

Keys, for a module ``M`` of the base model:

    base_model.model.M.lora_A.weight          [r, in]      ([r, in/g] with QA-LoRA)
    base_model.model.M.lora_B.weight          [out, r]
    base_model.model.M.lora_B.bias            [out]        only with "lora_bias": true
    base_model.model.M.lora_embedding_A       [r, vocab]   embedding LoRA; delta = (B @ A)^T
    base_model.model.M.lora_embedding_B       [dim, r]
    base_model.model.M.lora_magnitude_vector  [out]        DoRA
    base_model.model.M.weight                 full copy of a module in modules_to_save

Reading (:func:`read_adapter`) validates both files and returns a :class:`LoraAdapter`: a frozen
:class:`AdapterConfig`, one :class:`~compress.merge.lora.LoraModule` per adapted module and the full tensors
the adapter carries (``modules_to_save``, biases trained with ``bias="all"`` or ``"lora_only"``, embedding
layers PEFT saved beside an embedding LoRA). PEFT's rules for ``r`` and ``lora_alpha`` per module: from
``rank_pattern`` / ``alpha_pattern``, the first key ``K`` (in the file's order) for which the module name
matches the regex ``(.*\\.)?(K)$``.

Writing (:class:`AdapterSpec`, :class:`AdapterSink`): we write lora_alpha = r for every module, so the
scaling is 1 and the factors carry the delta as they are.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.checkpoint import read_safetensors_header
from compress.formats.output import OutputFolder, write_json
from compress.merge.lora import LoraModule

PREFIX = "base_model.model."  # every key of a saved PEFT adapter starts so
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
UNSUPPORTED_FIELDS = {
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "alora_invocation_tokens": "activated LoRA (aLoRA): the adapter acts only after its invocation tokens",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
}
# Initialisations after which PEFT expects a modified base model (unless converted when saving).
MUTATED_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide the weights, validated.

    ``rank_pattern`` / ``alpha_pattern`` keep the file's order (PEFT takes the first matching key).
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    use_dora: bool = False
    use_qalora: bool = False
    qalora_group_size: int = 16
    bias: str = "none"  # none | all | lora_only
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    init_lora_weights: Any = True
    base_model_name_or_path: str | None = None
    peft_version: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> AdapterConfig:
        """Validate a parsed adapter_config.json; every problem is an InputError naming the field."""
        if not isinstance(raw, dict):
            raise InputError("not a JSON object", where=where, fix="Fix or re-export the adapter.")
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise InputError(f"peft_type is {peft_type!r}, not LORA", where=where,
                             fix="Only LoRA adapters (and their DoRA, rsLoRA, QA-LoRA variants) can be merged.")
        for key, what in UNSUPPORTED_FIELDS.items():
            if raw.get(key) not in (None, False, [], {}):
                raise InputError(f"uses {what} ('{key}'), which merge does not support", where=where,
                                 fix="Merge it with PEFT (merge_and_unload), or retrain as plain LoRA.")

        def flag(name: str) -> bool:
            value = raw.get(name, False)
            if value is None:
                return False
            if not isinstance(value, bool):
                raise InputError(f"'{name}' must be true or false, got {value!r}", where=where, fix="Fix the config.")
            return value

        def number(name: str, value: Any, *, integer: bool) -> Any:
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
                kind = "a positive integer" if integer else "a positive number"
                raise InputError(f"'{name}' must be {kind}, got {value!r}", where=where, fix="Fix the config.")
            return value

        def pattern(name: str, integer: bool) -> tuple[tuple[str, Any], ...]:
            value = raw.get(name) or {}
            if not isinstance(value, dict):
                raise InputError(f"'{name}' must be an object", where=where, fix="Fix the config.")
            out = []
            for key, v in value.items():
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except re.error as e:
                    raise InputError(f"'{name}' key {key!r} is not a valid regex ({e})", where=where,
                                     fix="Fix the config.") from e
                out.append((str(key), number(f"{name}[{key!r}]", v, integer=integer)))
            return tuple(out)

        def names(name: str) -> tuple[str, ...] | str | None:
            value = raw.get(name)
            if value is None or isinstance(value, str):
                return value
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise InputError(f"'{name}' must be a string or a list of strings", where=where, fix="Fix the config.")

        bias = raw.get("bias") or "none"
        if bias not in ("none", "all", "lora_only"):
            raise InputError(f"'bias' must be none, all or lora_only, got {bias!r}", where=where, fix="Fix the config.")
        layers = raw.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and not (isinstance(layers, list) and all(isinstance(x, int) for x in layers)):
            raise InputError("'layers_to_transform' must be an integer or a list of integers", where=where,
                             fix="Fix the config.")
        layers_pattern = raw.get("layers_pattern")
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern] if layers_pattern else None
        modules_to_save = names("modules_to_save")
        if isinstance(modules_to_save, str):
            modules_to_save = (modules_to_save,)
        config = cls(
            r=number("r", raw.get("r", 8), integer=True),
            lora_alpha=number("lora_alpha", raw.get("lora_alpha", 8), integer=False),
            use_rslora=flag("use_rslora"),
            rank_pattern=pattern("rank_pattern", True),
            alpha_pattern=pattern("alpha_pattern", False),
            fan_in_fan_out=flag("fan_in_fan_out"),
            lora_bias=flag("lora_bias"),
            use_dora=flag("use_dora"),
            use_qalora=flag("use_qalora"),
            qalora_group_size=number("qalora_group_size", raw.get("qalora_group_size", 16), integer=True),
            bias=bias,
            target_modules=names("target_modules"),
            exclude_modules=names("exclude_modules"),
            modules_to_save=tuple(modules_to_save or ()),
            layers_to_transform=tuple(layers) if layers else None,
            layers_pattern=tuple(layers_pattern) if layers_pattern else None,
            init_lora_weights=raw.get("init_lora_weights", True),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            peft_version=raw.get("peft_version"),
        )
        if config.use_qalora and config.use_dora:
            raise InputError("use_qalora and use_dora are both set; PEFT has no such combination", where=where,
                             fix="Fix the config.")
        if config.use_qalora and config.fan_in_fan_out:
            raise InputError("use_qalora with fan_in_fan_out is not a layout PEFT produces", where=where,
                             fix="Fix the config.")
        return config

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """PEFT's per-module r and lora_alpha: the first pattern key whose regex matches the end of the
        module name at a '.' boundary, else the defaults."""
        r = next((v for k, v in self.rank_pattern if re.match(rf"(.*\.)?({k})$", module)), self.r)
        alpha = next((v for k, v in self.alpha_pattern if re.match(rf"(.*\.)?({k})$", module)), self.lora_alpha)
        return r, alpha

    def scaling(self, module: str) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (Kalajdzievski 2023, arXiv 2312.03732)."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def selects(self, module: str) -> bool:
        """Whether PEFT would wrap ``module`` with a LoRA layer under this config (its target matching:
        exclude_modules, modules_to_save, target_modules as a full-match regex or a list of names that
        match the end of the module name, layers_to_transform/layers_pattern). ``all-linear`` selects
        every module here: the tensor names alone do not say which modules are Linear layers."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, module):
                    return False
            elif module in ex or any(module.endswith(f".{e}") for e in ex):
                return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        targets = self.target_modules
        if targets is None or targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        if not any(module.endswith(f".{t}") for t in targets):
            return False
        if self.layers_to_transform is None:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            match = None
            for p in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if match:
                    break
        return match is not None and int(match.group("idx")) in self.layers_to_transform


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter as read from disk. ``replacements``: base tensor name -> full tensor that
    replaces it (modules_to_save, biases with bias="all"/"lora_only", saved embedding layers)."""

    path: Path
    config: AdapterConfig
    modules: dict[str, LoraModule]
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def features(self) -> list[str]:
        """Human-readable list of the PEFT features this adapter uses."""
        c = self.config
        kinds = {m.kind for m in self.modules.values()}
        out = []
        for cond, text in ((c.use_rslora, "rslora"), (bool(c.rank_pattern or c.alpha_pattern), "rank/alpha patterns"),
                           (c.fan_in_fan_out, "fan_in_fan_out"), (c.lora_bias, "lora_bias"), (c.use_dora, "dora"),
                           ("embedding" in kinds, "embedding"), ("qalora" in kinds, f"qalora g{c.qalora_group_size}"),
                           (bool(self.replacements), "full tensors")):
            if cond:
                out.append(text)
        return out or ["lora"]

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "base_model_name_or_path": self.config.base_model_name_or_path,
                "modules": len(self.modules), "ranks": self.ranks, "features": self.features(),
                "replaced_tensors": sorted(self.replacements), "peft_version": self.config.peft_version}


# --- reading -----------------------------------------------------------------------------------


LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_B.bias": ("linear", "bias"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": (None, "magnitude"),
    ".lora_magnitude_vector.weight": (None, "magnitude"),  # older PEFT releases
}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    read_safetensors_header(path)  # bounds checks first: the library trusts the header
    try:
        return load_file(str(path))
    except Exception as e:
        raise InputError(f"cannot read as safetensors ({e})", where=str(path),
                         fix="The file is corrupt; re-export the adapter.") from e


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder. Every problem is an InputError that names the
    file and the tensor or field: non-finite values, missing factors, ranks that disagree with the
    config, unknown tensors, variants PEFT cannot merge."""
    folder = Path(path)
    if not folder.exists():
        raise InputError("no such adapter folder", where=str(folder), fix="Check the path.")
    if folder.is_file():
        raise InputError("an adapter is a folder (adapter_config.json + adapter_model.safetensors), not a file",
                         where=str(folder), fix="Point at the folder that holds the adapter.")
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise InputError(f"no {CONFIG_NAME}", where=str(folder),
                         fix="Point at a PEFT LoRA adapter folder (model.save_pretrained on a PeftModel).")
    if not weights_path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise InputError("only pickle weights (adapter_model.bin) found" if pickled else f"no {WEIGHTS_NAME}",
                         where=str(folder),
                         fix="Pickle files can run code; re-save the adapter with safe_serialization=True."
                         if pickled else "The adapter folder is incomplete.")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the config ({e})", where=str(config_path),
                         fix="Fix or re-export the file.") from e
    config = AdapterConfig.from_dict(raw, str(config_path))
    missing = [k for k in ("r", "lora_alpha", "target_modules") if raw.get(k) is None]
    if missing:
        assumed = {"r": "r=8", "lora_alpha": "lora_alpha=8",
                   "target_modules": "target_modules: every module with factors in the adapter file"}
        from compress.formats.output import notice

        notice(f"{config_path} has no {', '.join(repr(k) for k in missing)}; taken as PEFT's defaults: "
               + ", ".join(assumed[k] for k in missing))
    tensors = _load_tensors(weights_path)
    where = str(weights_path)
    if not tensors:
        raise InputError("the adapter holds no tensors", where=where, fix="Re-export the adapter.")
    notes: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise InputError(f"tensor '{key}' does not start with '{PREFIX}', so it is not a PEFT adapter key",
                             where=where, fix="Re-export the adapter with PEFT's save_pretrained.")
        if not tensor.dtype.is_floating_point:
            raise InputError(f"tensor '{key}' has dtype {tensor.dtype}, not a float dtype", where=where,
                             fix="Re-export the adapter.")
        if not torch.isfinite(tensor).all():
            raise InputError(f"tensor '{key}' has non-finite values (NaN or inf)", where=where,
                             fix="The adapter is damaged (diverged training?); use an earlier checkpoint.")
        rest = key[len(PREFIX):]
        suffix = next((s for s in LORA_SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            if ".lora_" in rest or rest.startswith("lora_"):
                raise InputError(f"tensor '{key}' looks like a LoRA tensor but is not one PEFT writes", where=where,
                                 fix="Re-export the adapter with PEFT's save_pretrained (keys without the adapter "
                                     "name).")
            # A full tensor: the wrapped module's base_layer is the base model's module itself.
            replacements[rest.replace(".base_layer.", ".")] = tensor
            continue
        module = rest[: -len(suffix)]
        kind, part = LORA_SUFFIXES[suffix]
        parts.setdefault(module, {})[part] = tensor
        if kind:
            kinds.setdefault(module, set()).add(kind)
    modules: dict[str, LoraModule] = {}
    ignored_bias, ignored_magnitude = [], []
    for module, p in parts.items():
        if len(kinds.get(module, ())) > 1:
            raise InputError(f"module '{module}' has both linear and embedding LoRA tensors", where=where,
                             fix="Re-export the adapter.")
        if "A" not in p or "B" not in p:
            missing = "A" if "A" not in p else "B"
            raise InputError(f"module '{module}' has no lora_{missing} (LoRA needs both factors)", where=where,
                             fix="The adapter file is incomplete; re-export it.")
        if not config.selects(module):
            raise InputError(f"the adapter holds LoRA weights for '{module}' but its target_modules "
                             f"{config.target_modules!r} do not select that module (PEFT would ignore them)",
                             where=str(config_path), fix="The config and the weights disagree; fix target_modules.")
        kind = next(iter(kinds[module]))
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise InputError(f"module '{module}': lora_A {list(A.shape)} and lora_B {list(B.shape)} are not "
                             "factors of one product (A [r, in], B [out, r])", where=where,
                             fix="Re-export the adapter.")
        r, alpha = config.rank_and_alpha(module)
        if A.shape[0] != r:
            raise InputError(f"module '{module}' has rank {A.shape[0]} in the weights but r={r} in the config "
                             "(r / rank_pattern)", where=str(config_path),
                             fix="The config and the weights disagree; PEFT could not load this adapter.")
        group = None
        if kind == "linear" and config.use_qalora:
            kind, group = "qalora", config.qalora_group_size
        bias = p.get("bias")
        if bias is not None and not config.lora_bias:
            ignored_bias.append(module)
            bias = None
        if bias is not None and (kind == "embedding" or bias.shape != (B.shape[0],)):
            raise InputError(f"module '{module}': lora_B.bias of shape {list(bias.shape)} does not fit "
                             f"{'an embedding' if kind == 'embedding' else f'{B.shape[0]} outputs'}", where=where,
                             fix="Re-export the adapter.")
        magnitude = p.get("magnitude")
        if config.use_dora and magnitude is None:
            raise InputError(f"use_dora is set but module '{module}' has no lora_magnitude_vector", where=where,
                             fix="The adapter file is incomplete; re-export it.")
        if magnitude is not None and not config.use_dora:
            ignored_magnitude.append(module)
            magnitude = None
        if magnitude is not None and magnitude.shape != (B.shape[0],):
            raise InputError(f"module '{module}': lora_magnitude_vector has shape {list(magnitude.shape)}, "
                             f"expected [{B.shape[0]}]", where=where, fix="Re-export the adapter.")
        modules[module] = LoraModule(module=module, kind=kind, A=A, B=B, rank=r, alpha=alpha,
                                     scaling=config.scaling(module),
                                     fan_in_fan_out=config.fan_in_fan_out and kind != "embedding",
                                     bias=bias, magnitude=magnitude, group_size=group)
    if ignored_bias:
        notes.append(f"{folder.name}: lora_B.bias of {len(ignored_bias)} modules ignored because lora_bias is false "
                     f"(as PEFT does; first: {ignored_bias[0]})")
    if ignored_magnitude:
        notes.append(f"{folder.name}: lora_magnitude_vector of {len(ignored_magnitude)} modules ignored because "
                     f"use_dora is false (as PEFT does; first: {ignored_magnitude[0]})")
    init = str(config.init_lora_weights).lower()
    if any(init.startswith(m) for m in MUTATED_INITS):
        notes.append(f"{folder.name}: init_lora_weights={config.init_lora_weights!r} changes the base weights at "
                     "initialisation; unless the adapter was converted when saved "
                     "(path_initial_model_for_weight_conversion), it only fits the residual base it was trained on")
    return LoraAdapter(path=folder, config=config, modules=modules, replacements=replacements, notes=tuple(notes))


# --- writing -----------------------------------------------------------------------------------


@dataclass
class AdapterModule:
    """One module's adapter tensors. ``kind``: 'linear', 'embedding' or 'full' (modules_to_save)."""

    module: str
    kind: str
    A: torch.Tensor | None = None  # [r, in] (linear), [r, vocab] (embedding), [r, in/g] (QA-LoRA)
    B: torch.Tensor | None = None  # [out, r] (linear) or [dim, r] (embedding)
    bias: torch.Tensor | None = None  # [out]: the bias delta, only for linear
    weight: torch.Tensor | None = None  # full tensor for modules_to_save
    whole: dict[str, torch.Tensor] | None = None  # modules_to_save: further parameters by leaf name ('bias')

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        p = PREFIX + self.module
        out: dict[str, torch.Tensor] = {}
        if self.kind == "linear":
            assert self.A is not None and self.B is not None
            out[f"{p}.lora_A.weight"] = self.A
            out[f"{p}.lora_B.weight"] = self.B
            if self.bias is not None:
                out[f"{p}.lora_B.bias"] = self.bias
        elif self.kind == "embedding":
            assert self.A is not None and self.B is not None
            out[f"{p}.lora_embedding_A"] = self.A
            out[f"{p}.lora_embedding_B"] = self.B
        else:
            assert self.weight is not None or self.whole
            if self.weight is not None:
                out[f"{p}.weight"] = self.weight
            for leaf, tensor in sorted((self.whole or {}).items()):
                out[f"{p}.{leaf}"] = tensor
        return out


@dataclass
class AdapterSpec:
    """Everything adapter_config.json needs."""

    modules: list[AdapterModule] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    all_module_names: list[str] = field(default_factory=list)  # every module name of the base
    qalora_group_size: int | None = None  # QA-LoRA form (use_qalora): lora_A sees inputs pooled over such groups

    def config(self) -> dict[str, Any]:
        lora = [m for m in self.modules if m.kind in ("linear", "embedding")]
        ranks = [m.rank for m in lora]
        default_r = max(set(ranks), key=lambda r: (ranks.count(r), r)) if ranks else 8
        # PEFT matches pattern keys as regexes anchored at a module-name boundary; a full module name
        # can only match itself.
        rank_pattern = {m.module: m.rank for m in lora if m.rank != default_r}
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": default_r,
            "lora_alpha": default_r,
            "rank_pattern": rank_pattern,
            "alpha_pattern": dict(rank_pattern),  # alpha = r everywhere: scaling 1
            "target_modules": self.target_modules(),
            "modules_to_save": [m.module for m in self.modules if m.kind == "full"] or None,
            "lora_bias": any(m.bias is not None for m in lora),
            "use_rslora": False,
            "use_dora": False,
            **({"use_qalora": True, "qalora_group_size": self.qalora_group_size} if self.qalora_group_size else {}),
            "fan_in_fan_out": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
            "init_lora_weights": True,
        }

    def target_modules(self) -> list[str]:
        """Leaf names ('q_proj') when they pick out exactly the extracted modules of the base, else
        the full module names: PEFT matches a target against the end of each module name."""
        targets = sorted(m.module for m in self.modules if m.kind in ("linear", "embedding"))
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        matched = sorted(n for n in self.all_module_names if n.rsplit(".", 1)[-1] in leaves)
        return leaves if matched == targets else targets

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            out.update(m.tensors())
        return out


class AdapterSink:
    """An adapter folder: the extracted tensors are collected (they are small: rank-r factors), then
    :meth:`commit` writes ``adapter_model.safetensors`` and ``adapter_config.json`` into a staged folder
    (``folder``, where the report goes too) and renames it into place."""

    def __init__(self, out: Path, *, force: bool) -> None:
        self.staging = OutputFolder(out, force=force).__enter__()
        self.folder = self.staging.path
        self.committed = False

    def write_adapter(self, spec: AdapterSpec) -> int:
        """Write the adapter's two files; returns the bytes of its tensors."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in spec.state_dict().items()}
        save_file(tensors, str(self.folder / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(self.folder / CONFIG_NAME, spec.config())
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self) -> None:
        self.staging.commit()
        self.committed = True

    def abort(self) -> None:
        self.staging.abort()

    def __enter__(self) -> AdapterSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()
