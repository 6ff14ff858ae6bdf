"""The weight change each LoRA module makes, exactly as PEFT 0.21 computes it (pure math; reading adapter
files is :mod:`compress.formats.peft_adapter`'s job).

What PEFT does, and what the functions here reproduce (``s`` is the module's scaling):

- scaling ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``, per module.
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

from dataclasses import dataclass
from typing import Any

import torch

# Pooling factor c(in_features, group_size) of QA-LoRA adapters: dW[o, i] = c * s * (B @ A)[o, i // g].
QALORA_POOLING: dict[str, Any] = {
    "peft": lambda n_in, g: (n_in / g) / g,  # PEFT 0.21: group mean, times in/g
    "mean": lambda n_in, g: 1.0 / g,  # QA-LoRA reference code: average pool
    "sum": lambda n_in, g: 1.0,  # QA-LoRA paper, Algorithm 1: sum pool
}


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
