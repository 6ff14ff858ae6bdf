"""Putting a weight update into a quantized weight: the strategies of ``compress merge --quantize``.

Pure tensor math. The inputs are the update ``dW`` [out, in] (float32, already combined over
adapters), the target ``ideal`` [out, in] the merged weight should equal (the base the adapter was
trained on, plus ``dW``), and whichever forms of the base exist: the quantized base (an INT4 or NF4
tensor read from a quantized checkpoint) and/or the float base. Each strategy returns a quantized
tensor; :func:`best_merge` runs every applicable one and keeps one by :func:`choose`: an exact fold, else
the float merge quantized once when the float base is there, else the one closest to ``ideal``.

Strategies (``STRATEGIES``):

- ``fold`` -- exact, QA-LoRA style (Xu et al. 2023, arXiv 2309.14717, section 3.3). When ``dW`` is
  constant inside every quantization group of the base (a QA-LoRA adapter whose pooling groups are
  the base's groups, or unions of them), ``dequant(base) + dW = s * q + (m + dW_group)``: the update
  goes into the per-group float offsets, codes and scales unchanged, and the merged weight equals
  ``dequant(base) + dW`` to float32 rounding. Needs an INT4 base and float offsets in the output
  (the ``native`` layout; GGUF Q4_1 holds them in float16).
- ``fold-requant`` -- for any ``dW`` on an INT4 base: fold the group means of ``dW`` into the
  offsets (exact), then move each code by the rounded rest, ``q' = clamp(q + round(r / s), 0, 15)``
  with ``r = dW - group mean``: codes change only where the rest exceeds half a step.
- ``refit`` -- ``fold-requant``, then two rounds of least-squares refitting: per group, the scale
  and offset that best fit ``ideal`` given the codes (a 2-parameter linear regression; the scale is
  rounded to its stored dtype, the offset refitted after rounding), then the codes given them. Kept
  only where it lowers the error. This is the strategy that does best when the float base is absent.
- ``requantize`` -- dequantize, add, quantize again from scratch (what PEFT does for bitsandbytes
  bases); the only choice for NF4, which has no offsets.
- ``float`` -- quantize ``W_float + dW`` once: needs the float base (``--float-base``).

Integer zero points (GPTQ) cannot hold a float offset: :func:`to_integer_zeros` rounds ``-m / s`` to
the nearest integer in 0..15, and the report measures what that costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.catalog import STRATEGIES  # re-exported
from compress.metrics import ErrorMetrics
from compress.quant.base import QuantizedTensor
from compress.quant.int4 import AffineInt4Tensor, Int4Config, Int4Tensor

REFIT_ROUNDS = 2


def _groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [out, in] -> (full groups [out, n_full, G], partial last group [out, in % G] or None)."""
    out_features, in_features = x.shape
    full = in_features - in_features % group_size
    head = x[:, :full].reshape(out_features, full // group_size, group_size)
    return head, (x[:, full:] if full < in_features else None)


def group_means(dW: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of dW [out, in] over each group of ``group_size`` input channels: [out, ceil(in / G)]."""
    head, tail = _groups(dW.float(), group_size)
    means = head.mean(dim=-1)
    if tail is not None:
        means = torch.cat([means, tail.mean(dim=-1, keepdim=True)], dim=1)
    return means


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in]: each group's value repeated over its input channels."""
    index = torch.arange(in_features, device=per_group.device) // group_size
    return per_group[:, index]


def is_group_constant(dW: torch.Tensor, group_size: int) -> bool:
    """Whether dW [out, in] takes one value inside every group (exactly: a QA-LoRA update)."""
    head, tail = _groups(dW, group_size)
    if not bool((head == head[..., :1]).all()):
        return False
    return tail is None or bool((tail == tail[:, :1]).all())


def as_affine(qt: QuantizedTensor) -> AffineInt4Tensor:
    """An INT4 tensor with float offsets (integer zeros become offsets exactly)."""
    if isinstance(qt, AffineInt4Tensor):
        return qt
    if isinstance(qt, Int4Tensor):
        return qt.to_affine()
    raise TypeError(f"offsets exist only for INT4 tensors, not {type(qt).__name__}")


def fold(base: QuantizedTensor, dW: torch.Tensor) -> AffineInt4Tensor:
    """Add a group-constant ``dW`` [out, in] to the offsets of an INT4 ``base``; codes and scales unchanged.

    Raises ValueError when dW is not constant inside the base's groups (then nothing can be folded exactly).
    """
    aff = as_affine(base)
    if not is_group_constant(dW, aff.group_size):
        raise ValueError(f"the update is not constant inside groups of {aff.group_size} input channels, so it "
                         "cannot be folded into the offsets exactly")
    per_group = dW.float()[:, :: aff.group_size]  # any element of each group: they are all equal
    return AffineInt4Tensor(shape=aff.shape, dtype=aff.dtype, codes=aff.codes, scales=aff.scales,
                            offsets=aff.offsets + per_group, group_size=aff.group_size, scale_dtype=aff.scale_dtype)


def fold_requant(base: QuantizedTensor, dW: torch.Tensor) -> AffineInt4Tensor:
    """Fold the group means of ``dW`` into the offsets, round the rest into the codes (scales unchanged)."""
    aff = as_affine(base)
    means = group_means(dW, aff.group_size)
    rest = dW.float() - expand_groups(means, aff.shape[1], aff.group_size)
    scale = expand_groups(aff.scales, aff.shape[1], aff.group_size)
    codes = (aff.codes.float() + torch.round(rest / scale)).clamp_(0, 15).to(torch.uint8)
    return AffineInt4Tensor(shape=aff.shape, dtype=aff.dtype, codes=codes, scales=aff.scales,
                            offsets=aff.offsets + means, group_size=aff.group_size, scale_dtype=aff.scale_dtype)


def _refit_round(qt: AffineInt4Tensor, ideal: torch.Tensor) -> AffineInt4Tensor:
    """One round: least-squares (scale, offset) per group given the codes, then codes given them."""
    G, n_in = qt.group_size, qt.shape[1]
    q = qt.codes.float()
    n = torch.full((qt.n_groups,), float(G), device=q.device)
    if n_in % G:
        n[-1] = n_in % G

    def gsum(x: torch.Tensor) -> torch.Tensor:
        head, tail = _groups(x, G)
        s = head.sum(dim=-1)
        return torch.cat([s, tail.sum(dim=-1, keepdim=True)], dim=1) if tail is not None else s

    sq, sy, sqq, sqy = gsum(q), gsum(ideal), gsum(q * q), gsum(q * ideal)
    var = sqq - sq * sq / n
    cov = sqy - sq * sy / n
    # A group whose codes are all equal has no slope to fit: keep its scale.
    scale = torch.where(var > 0, cov / var.clamp(min=1e-30), qt.scales)
    scale = torch.where(scale > 0, scale, qt.scales)
    scale = scale.to(qt.scale_dtype).float()
    scale = torch.where(scale > 0, scale, qt.scales)  # never let rounding make a scale zero
    offset = (sy - scale * sq) / n
    s_full = expand_groups(scale, n_in, G)
    m_full = expand_groups(offset, n_in, G)
    codes = torch.round((ideal - m_full) / s_full).clamp_(0, 15)
    # offsets once more for the new codes (the scale stays as stored)
    offset = (sy - scale * gsum(codes)) / n
    return AffineInt4Tensor(shape=qt.shape, dtype=qt.dtype, codes=codes.to(torch.uint8), scales=scale,
                            offsets=offset, group_size=G, scale_dtype=qt.scale_dtype)


def refit(base: QuantizedTensor, dW: torch.Tensor, ideal: torch.Tensor) -> AffineInt4Tensor:
    """``fold_requant``, then least-squares refitting rounds, each kept only if it lowers ||ideal - W'||."""
    best = fold_requant(base, dW)
    best_err = float(torch.sum((best.dequantize(torch.float32) - ideal) ** 2, dtype=torch.float64))
    current = best
    for _ in range(REFIT_ROUNDS):
        current = _refit_round(current, ideal.float())
        err = float(torch.sum((current.dequantize(torch.float32) - ideal) ** 2, dtype=torch.float64))
        if err < best_err:
            best, best_err = current, err
    return best


def to_integer_zeros(qt: AffineInt4Tensor, symmetric: bool = False) -> Int4Tensor:
    """The nearest INT4 tensor with integer zero points (GPTQ): z = clamp(round(-m / s), 0, 15).

    Codes and scales are unchanged; the offsets lose their fractional part (at most half a step per group
    unless the clamp bites). ``symmetric`` only labels the result (zeros are whatever the offsets give).
    """
    zeros = torch.round(-qt.offsets / qt.scales).clamp_(0, 15).to(torch.uint8)
    return Int4Tensor(shape=qt.shape, dtype=qt.dtype, codes=qt.codes, scales=qt.scales, zeros=zeros,
                      group_size=qt.group_size, symmetric=symmetric, scale_dtype=qt.scale_dtype)


@dataclass
class MergeOutcome:
    """The quantized merged weight, the strategy that made it, and its error against ``ideal``."""

    tensor: QuantizedTensor
    strategy: str
    metrics: ErrorMetrics
    tried: dict[str, float]  # strategy -> relative Frobenius error against ideal (every strategy run)


def applicable(strategy: str, *, base_q: QuantizedTensor | None, has_float: bool, has_dequantized: bool,
               group_constant: bool, output_offsets: str) -> str | None:
    """Why ``strategy`` cannot run here (None if it can). ``output_offsets``: 'float', 'integer' or 'none'."""
    int4_base = isinstance(base_q, Int4Tensor | AffineInt4Tensor)
    if strategy == "float":
        return None if has_float else "needs the float base (--float-base)"
    if strategy == "requantize":
        return None if has_dequantized else "the base is not quantized (the float strategy is the same thing)"
    if not int4_base:
        return "needs an INT4 base (NF4 and float bases have no offsets to fold into)"
    if output_offsets == "none":
        return "the output format has no offsets (NF4)"
    if strategy == "fold" and not group_constant:
        return "the update is not constant inside the base's quantization groups (not a QA-LoRA update)"
    return None


def choose(errors: dict[str, ErrorMetrics], strategies: tuple[str, ...], *, exact_fold: bool) -> str:
    """Which result to keep (``auto``): an exact fold first (a group-constant update into float offsets);
    else, when the float base is available, the float merge quantized once; else the smallest error
    against the ideal.

    Why the float merge wins over a smaller weight error: the weight error mixes two things of very
    different cost. Random rounding noise of a fresh quantization costs little (second order in the
    loss), while losing the update -- the direction training found useful -- costs first order. With
    the float base, a strategy that starts from the quantized base can reach a smaller total error by
    reproducing the base more closely (e.g. ``refit`` recovers a base that already lies on a 4-bit
    grid) and still drop the update; on SmolLM2 that kept far less of a LoRA's held-out improvement
    than ``float`` (reports/bench_merge.md). Without the float base every candidate starts from the
    same quantized base, and the error against the ideal *is* the update that did not arrive.
    """
    if "fold" in errors and exact_fold:
        return "fold"
    if "float" in errors:
        return "float"
    return min(errors, key=lambda k: (errors[k].rel_fro, strategies.index(k)))


def best_merge(dW: torch.Tensor, ideal: torch.Tensor, *, base_q: QuantizedTensor | None,
               base_float: torch.Tensor | None, quantize: Callable[[torch.Tensor], QuantizedTensor],
               output_offsets: str, base_dequantized: torch.Tensor | None = None,
               strategies: tuple[str, ...] = STRATEGIES) -> MergeOutcome:
    """Run every applicable strategy among ``strategies`` and keep one (:func:`choose`).

    Args:
        dW: [out, in] float32 update (the combined adapters).
        ideal: [out, in] float32 target (the base the adapter was trained on, plus dW).
        base_q: the quantized base weight whose offsets the fold strategies may change (an INT4 tensor in
            the output's group size), else None.
        base_float: [out, in] the float base weight, when available, else None.
        base_dequantized: [out, in] the quantized base as float (any method), for ``requantize``; None
            when the base is float. Defaults to ``base_q.dequantize()``.
        quantize: the output method's quantizer (W -> QuantizedTensor), for ``requantize`` and ``float``.
        output_offsets: what the output layout stores per group: 'float' (native), 'integer' (GPTQ,
            fold results are rounded with :func:`to_integer_zeros`) or 'none' (NF4).
        strategies: the candidates (in order of preference on ties).
    """
    group_constant = isinstance(base_q, Int4Tensor | AffineInt4Tensor) and is_group_constant(dW, base_q.group_size)
    if base_dequantized is None and base_q is not None:
        base_dequantized = base_q.dequantize(torch.float32)
    results: dict[str, QuantizedTensor] = {}
    for name in strategies:
        if applicable(name, base_q=base_q, has_float=base_float is not None,
                      has_dequantized=base_dequantized is not None, group_constant=group_constant,
                      output_offsets=output_offsets) is not None:
            continue
        if name == "float":
            assert base_float is not None
            qt: QuantizedTensor = quantize(base_float.float() + dW)
        elif name == "requantize":
            assert base_dequantized is not None
            qt = quantize(base_dequantized.float() + dW)
        else:
            assert base_q is not None
            qt = fold(base_q, dW) if name == "fold" else (
                fold_requant(base_q, dW) if name == "fold-requant" else refit(base_q, dW, ideal))
            if output_offsets == "integer":
                qt = to_integer_zeros(qt, symmetric=bool(getattr(base_q, "symmetric", False)))
        results[name] = qt
    if not results:
        raise ValueError("no merge strategy applies to this weight")
    errors = {name: qt.error_against(ideal) for name, qt in results.items()}
    best = choose(errors, strategies, exact_fold=group_constant and output_offsets == "float")
    return MergeOutcome(tensor=results[best], strategy=best, metrics=errors[best],
                        tried={k: v.rel_fro for k, v in errors.items()})


def int4_config_of(qt: QuantizedTensor) -> Int4Config | None:
    """The INT4 config a quantized base was made with (to quantize merged weights the same way)."""
    if isinstance(qt, Int4Tensor):
        return Int4Config(group_size=qt.group_size, symmetric=qt.symmetric, scale_dtype=qt.scale_dtype)
    if isinstance(qt, AffineInt4Tensor):
        return Int4Config(group_size=qt.group_size, symmetric=False, scale_dtype=qt.scale_dtype)
    return None


__all__ = ["STRATEGIES", "MergeOutcome", "applicable", "as_affine", "best_merge", "expand_groups",
           "fold", "fold_requant", "group_means", "int4_config_of", "is_group_constant", "refit",
           "to_integer_zeros"]
