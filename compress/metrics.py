"""Error metrics between an original tensor W and its reconstruction W' (float32 values, float64
accumulation, on whatever device the tensors are on)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ErrorMetrics:
    """rel_fro = ||W - W'||_F / ||W||_F; sqnr_db = 20 log10(||W|| / ||W - W'||);
    max_abs = max |W - W'|; cosine = <W, W'> / (||W|| ||W'||)."""

    rel_fro: float
    sqnr_db: float
    max_abs: float
    cosine: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def compare(W: torch.Tensor, W_hat: torch.Tensor) -> ErrorMetrics:
    """Metrics of W_hat against W (same shape). Exact zeros give rel_fro 0, SQNR inf, cosine 1.

    Differences are taken in float32 (exact when the two values are within a factor of 2, else
    within one float32 rounding), and every sum of squares accumulates in float64, which keeps the
    figures accurate to ~1e-7 relative on tensors of any size without float64 copies. The inner
    product comes from the polarisation identity <a, b> = (|a|^2 + |b|^2 - |a - b|^2) / 2.
    """
    a = W.detach().reshape(-1).float()
    b = W_hat.detach().reshape(-1).float()
    diff = a - b
    norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    norm_d = float(torch.linalg.vector_norm(diff, dtype=torch.float64))
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    sqnr = math.inf if norm_d == 0 else (20 * math.log10(norm_a / norm_d) if norm_a > 0 else -math.inf)
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    if norm_a > 0 and norm_b > 0:
        cosine = (norm_a**2 + norm_b**2 - norm_d**2) / (2 * norm_a * norm_b)
        cosine = max(-1.0, min(1.0, cosine))
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    return ErrorMetrics(rel_fro=rel, sqnr_db=sqnr, max_abs=max_abs, cosine=cosine)
