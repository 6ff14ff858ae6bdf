"""PEFT LoRA adapters read exactly as PEFT defines them, and the weight change each module makes.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(shared/reference/formats.md, section 5). :func:`read_adapter` validates both and returns a
:class:`LoraAdapter`: a frozen :class:`AdapterConfig`, one :class:`LoraModule` per adapted module
and the full tensors the adapter carries (``modules_to_save``, biases trained with ``bias="all"`` or
``"lora_only"``, embedding layers PEFT saved beside an embedding LoRA).

What PEFT 0.21 does, and what the functions here reproduce (``s`` is the module's scaling):

- scaling ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern``: the first key ``K`` (in the
  file's order) for which the module name matches the regex ``(.*\\.)?(K)$``.
- Linear: ``dW = (B @ A) * s``, transposed with ``fan_in_fan_out`` (GPT-2's Conv1D stores the
  weight as [in, out]). ``lora_bias``: the bias changes by ``lora_B.bias * s``.
- Embedding: ``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r], ``dW = (B @ A)^T * s``.
- DoRA (``use_dora``): not additive. ``W' = m / ||W + dW|| * (W + dW)``, the norm taken for each
  output channel over the input axis of the *unmerged* ``W + dW`` in float32 and treated as a
  constant (PEFT detaches it); ``m`` is ``lora_magnitude_vector`` [out]. Output channels are the
  rows of a Linear weight, the columns of a Conv1D (fan_in_fan_out) or embedding weight.
- QA-LoRA (``use_qalora``, ``qalora_group_size: g``): ``lora_A`` is [r, in/g] and sees the input
  pooled over each group of ``g`` consecutive input channels, so the dense delta is constant inside
  every (row, group): ``dW[o, i] = c * s * (B @ A)[o, i // g]``. ``c`` depends on the pooling the
  training code used (:data:`QALORA_POOLING`): PEFT 0.21 takes the group mean and multiplies it by
  ``in/g`` (``c = (in/g) / g``, the default); the QA-LoRA reference code averages (``c = 1/g``); the
  paper's algorithm sums (``c = 1``). PEFT itself cannot merge these (NotImplementedError).

Computation is float32 throughout, in the same order of operations as PEFT, so a float32 adapter
on a float32 base gives PEFT's merged weights bit for bit. (For float16/bfloat16 adapters on CPU,
PEFT rounds ``dW`` to the adapter's dtype before adding it; we add the float32 ``dW``.)
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
from compress.formats.peft_adapter import PREFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Pooling factor c(in_features, group_size) of QA-LoRA adapters: dW[o, i] = c * s * (B @ A)[o, i // g].
QALORA_POOLING: dict[str, Any] = {
    "peft": lambda n_in, g: (n_in / g) / g,  # PEFT 0.21: group mean, times in/g
    "mean": lambda n_in, g: 1.0 / g,  # QA-LoRA reference code: average pool
    "sum": lambda n_in, g: 1.0,  # QA-LoRA paper, Algorithm 1: sum pool
}

# Config fields that select LoRA variants whose merge is not W + dW (or that PEFT cannot merge).
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
class LoraModule:
    """One adapted module. Shapes: ``A`` [r, in] (linear), [r, vocab] (embedding), [r, in/g] (qalora);
    ``B`` [out, r] (linear, qalora), [dim, r] (embedding); ``bias`` [out] (lora_B.bias, unscaled,
    only with lora_bias); ``magnitude`` [out] (DoRA)."""

    module: str
    kind: str  # linear | embedding | qalora
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    group_size: int | None = None  # qalora only

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"

    @property
    def in_features(self) -> int:
        """Input size of the adapted layer (vocabulary size for an embedding)."""
        n = self.A.shape[1]
        return n * self.group_size if self.kind == "qalora" and self.group_size else n

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def out_axis(self) -> int:
        """The axis of the stored weight that indexes output channels: 0 for Linear weights [out, in],
        1 for Conv1D (fan_in_fan_out, [in, out]) and embedding weights ([vocab, dim])."""
        return 1 if (self.kind == "embedding" or self.fan_in_fan_out) else 0

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape the base weight must have."""
        if self.out_axis == 1:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None


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


# --- the math ----------------------------------------------------------------------------------


def _factors(entry: LoraModule, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = entry.A.float(), entry.B.float()
    if device is not None:
        A, B = A.to(device), B.to(device)
    return A, B


def qalora_group_delta(entry: LoraModule, pooling: str = "peft", *, device: torch.device | None = None
                       ) -> torch.Tensor:
    """A QA-LoRA module's delta per (row, group): ``G = (B @ A) * (c * s)``, float32 [out, in/g].

    Every input channel ``i`` of group ``j = i // g`` changes by ``G[o, j]``; ``c`` is the pooling
    factor (:data:`QALORA_POOLING`). For a quantized base with group size ``g`` this is the amount to
    fold into each group's zero point.
    """
    if entry.kind != "qalora" or entry.group_size is None:
        raise ValueError(f"'{entry.module}' is not a QA-LoRA module")
    if pooling not in QALORA_POOLING:
        raise ValueError(f"unknown QA-LoRA pooling {pooling!r}; choose one of {', '.join(QALORA_POOLING)}")
    A, B = _factors(entry, device)
    factor = QALORA_POOLING[pooling](entry.in_features, entry.group_size)
    return (B @ A) * (factor * entry.scaling)


def expand_group_delta(group_delta: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in/g] -> [out, in]: each group's value repeated over its ``g`` input channels."""
    return group_delta.repeat_interleave(group_size, dim=1)


def module_delta(entry: LoraModule, base_weight: torch.Tensor | None = None, *, qalora_pooling: str = "peft",
                 device: torch.device | None = None) -> torch.Tensor:
    """The dense change ``dW`` (float32) of a module's weight, in the stored layout of that weight:
    [out, in] for Linear, [in, out] with fan_in_fan_out, [vocab, dim] for embeddings.

    Computed as PEFT's ``get_delta_weight`` does: ``transpose(B @ A) * scaling``. For DoRA modules
    this is the LoRA part only; the merged weight comes from :func:`dora_merge`. ``base_weight``
    (optional) is checked for shape and gives the device.
    """
    if device is None and base_weight is not None:
        device = base_weight.device
    if entry.kind == "qalora":
        assert entry.group_size is not None
        dW = expand_group_delta(qalora_group_delta(entry, qalora_pooling, device=device), entry.group_size)
    else:
        A, B = _factors(entry, device)
        product = B @ A
        if entry.out_axis == 1:
            product = product.T
        dW = product * entry.scaling
    if base_weight is not None and tuple(base_weight.shape) != tuple(dW.shape):
        raise ValueError(f"'{entry.module}': delta of shape {list(dW.shape)} does not fit the weight of shape "
                         f"{list(base_weight.shape)}")
    return dW


def bias_delta(entry: LoraModule, *, device: torch.device | None = None) -> torch.Tensor | None:
    """The bias change of a lora_bias module, ``lora_B.bias * scaling`` (float32 [out]), else None."""
    if entry.bias is None:
        return None
    b = entry.bias.float()
    return (b.to(device) if device is not None else b) * entry.scaling


def dora_norm(entry: LoraModule, base_weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||W + dW||`` per output channel (float32 [out]), as PEFT's ``get_weight_norm`` computes it:
    on the weight viewed as [out, in], over dim 1."""
    W = base_weight.float()
    if entry.out_axis == 1:
        return torch.linalg.norm(W.T + delta.T, dim=1)
    return torch.linalg.norm(W + delta, dim=1)


def dora_merge(entry: LoraModule, base_weight: torch.Tensor, delta: torch.Tensor | None = None, *,
               qalora_pooling: str = "peft") -> torch.Tensor:
    """The merged weight of a DoRA module (float32, stored layout):
    ``W' = (m / ||W + dW||) * (W + dW)``, the norm per output channel of the unmerged weight
    (Liu et al. 2024, https://arxiv.org/abs/2402.09353; a constant, as PEFT detaches it)."""
    if entry.magnitude is None:
        raise ValueError(f"'{entry.module}' is not a DoRA module")
    W = base_weight.float()
    dW = module_delta(entry, W, qalora_pooling=qalora_pooling) if delta is None else delta
    factor = entry.magnitude.float().to(W.device) / dora_norm(entry, W, dW)
    factor = factor.view(1, -1) if entry.out_axis == 1 else factor.view(-1, 1)
    return factor * (W + dW)
