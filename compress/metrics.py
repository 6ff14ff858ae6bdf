"""Error metrics between an original tensor W and its reconstruction W' (float32 values, float64
accumulation, on whatever device the tensors are on)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class ErrorMetrics:
    """rel_fro = ||W - W'||_F / ||W||_F; sqnr_db = 20 log10(||W|| / ||W - W'||);
    max_abs = max |W - W'|; cosine = <W, W'> / (||W|| ||W'||). ``reference_finite``: whether W held only
    finite values (its float64 sum of squares is finite exactly then: finite float32 squares cannot overflow
    it), which lets a caller check its input without another pass over it."""

    rel_fro: float
    sqnr_db: float
    max_abs: float
    cosine: float
    reference_finite: bool = field(default=True, compare=False, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "reference_finite"}


# Elements per slice: float64 sums run on slices of this size, so the metrics never hold more than a
# few MiB beyond their inputs, whatever the tensor's size (a whole-tensor float64 copy would be 2x it).
CHUNK_ELEMENTS = 1 << 20


def _slices(n: int) -> range:
    return range(0, n, CHUNK_ELEMENTS)


def frobenius_norm(M: torch.Tensor) -> float:
    """||M||_F of any-shape M, squares summed in float64 slice by slice. Non-finite M gives nan or inf."""
    flat = M.detach().reshape(-1)
    total = 0.0
    for i in _slices(flat.numel()):
        total += float(torch.sum(flat[i:i + CHUNK_ELEMENTS].double() ** 2))
    return math.sqrt(total)


def _sum_squares(x: torch.Tensor) -> float:
    """sum(x^2) in float64 (x * x is exactly what x ** 2 computes, squared in place)."""
    x64 = x.double()
    return float(torch.sum(x64.mul_(x64)))


class _Sums:
    """The float64 sums of :func:`compare`, one slice of CHUNK_ELEMENTS at a time."""

    def __init__(self) -> None:
        self.a = self.b = self.d = 0.0
        self.maxima: list[float] = []

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.float(), b.float()
        diff = a - b
        self.a += _sum_squares(a)
        self.b += _sum_squares(b)
        self.d += _sum_squares(diff)
        low, high = torch.aminmax(diff)  # max |d| = max(-min d, max d) in one pass; NaN propagates
        self.maxima.append(float(torch.maximum(-low, high).abs()))  # abs: +0.0, not -0.0, when d is all zero

    def metrics(self) -> ErrorMetrics:
        max_abs = math.nan if any(math.isnan(m) for m in self.maxima) else max(self.maxima, default=0.0)
        norm_a, norm_b, norm_d = math.sqrt(self.a), math.sqrt(self.b), math.sqrt(self.d)
        rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
        sqnr = math.inf if norm_d == 0 else (20 * math.log10(norm_a / norm_d) if norm_a > 0 else -math.inf)
        if norm_a > 0 and norm_b > 0:
            cosine = (norm_a**2 + norm_b**2 - norm_d**2) / (2 * norm_a * norm_b)
            cosine = max(-1.0, min(1.0, cosine))
        else:
            cosine = 1.0 if norm_a == norm_b else 0.0
        return ErrorMetrics(rel_fro=rel, sqnr_db=sqnr, max_abs=max_abs, cosine=cosine,
                            reference_finite=math.isfinite(self.a))


def compare_stream(W: torch.Tensor, pieces: Iterable[torch.Tensor]) -> ErrorMetrics:
    """:func:`compare` of ``W`` against a W' given as consecutive flat pieces (any lengths, summing to
    ``W.numel()``): the same slices, the same sums, the same figures, without W' ever whole in memory."""
    a_all = W.detach().reshape(-1)
    sums = _Sums()
    held: list[torch.Tensor] = []  # the pieces of the current slice
    held_n = start = 0
    for piece in pieces:
        piece = piece.detach().reshape(-1)
        while piece.numel():
            take = min(CHUNK_ELEMENTS - held_n, piece.numel())
            held.append(piece[:take])
            held_n += take
            piece = piece[take:]
            if held_n == CHUNK_ELEMENTS:
                sums.add(a_all[start:start + held_n], held[0] if len(held) == 1 else torch.cat(held))
                start += held_n
                held, held_n = [], 0
    if held_n:
        sums.add(a_all[start:start + held_n], held[0] if len(held) == 1 else torch.cat(held))
        start += held_n
    if start != a_all.numel():
        raise ValueError(f"compare: {start} values given for a tensor of {a_all.numel()}")
    return sums.metrics()


def compare(W: torch.Tensor, W_hat: torch.Tensor) -> ErrorMetrics:
    """Metrics of W_hat against W (same shape). Exact zeros give rel_fro 0, SQNR inf, cosine 1.

    Differences are taken in float32 (exact when the two values are within a factor of 2, else
    within one float32 rounding), and every sum of squares accumulates in float64, slice by slice,
    which keeps the figures accurate to ~1e-7 relative on tensors of any size with only a few MiB of
    working memory. The inner product comes from the polarisation identity
    <a, b> = (|a|^2 + |b|^2 - |a - b|^2) / 2.
    """
    if W.shape != W_hat.shape:
        raise ValueError(f"compare: shapes differ, {tuple(W.shape)} vs {tuple(W_hat.shape)}")
    a_all = W.detach().reshape(-1)
    b_all = W_hat.detach().reshape(-1)
    sums = _Sums()
    for i in _slices(a_all.numel()):
        sums.add(a_all[i:i + CHUNK_ELEMENTS], b_all[i:i + CHUNK_ELEMENTS])
    return sums.metrics()


def logit_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """How close an engine's logits (``theirs``) are to a reference model's (``ours``), both [positions, vocab].

    Computed in float64. max_abs: max |diff|; rel_max: max_abs / std(ours) (the logit scale); rel_rms:
    rms(diff) / std(ours); argmax: fraction of positions whose top token is the same; corr_min / corr_mean:
    Pearson correlation over the vocabulary, worst and mean position; kl_max / kl_mean: KL(ours || theirs)
    of the next-token distributions, nats.
    """
    a, b = ours.double(), theirs.double()
    diff, scale = b - a, a.std()
    ac, bc = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    corr = (ac * bc).sum(-1) / ((ac * ac).sum(-1) * (bc * bc).sum(-1)).sqrt()
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return {"positions": int(a.shape[0]), "logit_std": float(scale), "max_abs": float(diff.abs().max()),
            "rel_max": float(diff.abs().max() / scale), "rel_rms": float(diff.pow(2).mean().sqrt() / scale),
            "argmax": float((a.argmax(-1) == b.argmax(-1)).double().mean()), "corr_min": float(corr.min()),
            "corr_mean": float(corr.mean()), "kl_max": float(kl.max()), "kl_mean": float(kl.mean())}
