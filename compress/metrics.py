"""Error metrics between an original tensor W and its reconstruction W' (computed in float64
accumulation over float32 values, on whatever device the tensors are on)."""

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
    """Metrics of W_hat against W (same shape). Exact zeros give rel_fro 0, SQNR inf, cosine 1."""
    a = W.detach().reshape(-1).double()
    b = W_hat.detach().reshape(-1).double()
    diff = a - b
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    norm_d = float(torch.linalg.vector_norm(diff))
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    sqnr = math.inf if norm_d == 0 else (20 * math.log10(norm_a / norm_d) if norm_a > 0 else -math.inf)
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    if norm_a > 0 and norm_b > 0:
        cosine = float(torch.dot(a, b)) / (norm_a * norm_b)
    else:
        cosine = 1.0 if norm_a == norm_b else 0.0
    return ErrorMetrics(rel_fro=rel, sqnr_db=sqnr, max_abs=max_abs, cosine=cosine)
