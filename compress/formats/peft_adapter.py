"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT writes
and reads them (shared/reference/formats.md, section 5).

Keys, for a module ``M`` of the base model:

    base_model.model.M.lora_A.weight          [r, in]
    base_model.model.M.lora_B.weight          [out, r]
    base_model.model.M.lora_B.bias            [out]        only with "lora_bias": true
    base_model.model.M.lora_embedding_A       [r, vocab]   embedding LoRA; delta = (B @ A)^T
    base_model.model.M.lora_embedding_B       [dim, r]
    base_model.model.M.weight                 full copy of a module in modules_to_save

Delta: dW = (lora_alpha / r) * B @ A (``lora_alpha / sqrt(r)`` with use_rslora); per-module r and
alpha in ``rank_pattern`` / ``alpha_pattern``. We write lora_alpha = r for every module, so the
scaling is 1 and the factors carry the delta as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PREFIX = "base_model.model."


@dataclass
class AdapterModule:
    """One module's adapter tensors. ``kind``: 'linear', 'embedding' or 'full' (modules_to_save)."""

    module: str
    kind: str
    A: torch.Tensor | None = None  # [r, in] (linear) or [r, vocab] (embedding)
    B: torch.Tensor | None = None  # [out, r] (linear) or [dim, r] (embedding)
    bias: torch.Tensor | None = None  # [out]: the bias delta, only for linear
    weight: torch.Tensor | None = None  # full tensor for modules_to_save

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
            assert self.weight is not None
            out[f"{p}.weight"] = self.weight
        return out


@dataclass
class AdapterSpec:
    """Everything adapter_config.json needs."""

    modules: list[AdapterModule] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    all_module_names: list[str] = field(default_factory=list)  # every module name of the base

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

