"""Error metrics: slice-by-slice float64 sums against a whole-tensor float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from compress import metrics
from compress.metrics import compare, frobenius_norm


def reference(W: torch.Tensor, W_hat: torch.Tensor) -> dict[str, float]:
    a, b = W.double().reshape(-1), W_hat.double().reshape(-1)
    d = a - b
    return {"rel_fro": float(d.norm() / a.norm()), "max_abs": float(d.abs().max()),
            "cosine": float(a @ b / (a.norm() * b.norm())), "sqnr_db": float(20 * torch.log10(a.norm() / d.norm()))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compare_matches_float64_reference_across_slices(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n = 2 * metrics.CHUNK_ELEMENTS + 12343  # three slices, the last one partial (n is a multiple of 5)
    W = torch.randn(n, generator=g).to(dtype).reshape(-1, 5)
    W_hat = (W.float() + 0.01 * torch.randn(W.shape, generator=g)).to(dtype)
    got, ref = compare(W, W_hat), reference(W, W_hat)
    assert got.rel_fro == pytest.approx(ref["rel_fro"], rel=1e-6)
    assert got.max_abs == pytest.approx(ref["max_abs"], rel=1e-6)
    assert got.cosine == pytest.approx(ref["cosine"], abs=1e-9)
    assert got.sqnr_db == pytest.approx(ref["sqnr_db"], abs=1e-5)
    assert frobenius_norm(W) == pytest.approx(float(W.double().norm()), rel=1e-12)


def test_compare_edge_cases() -> None:
    zeros = torch.zeros(3, 4)
    same = compare(zeros, zeros)
    assert (same.rel_fro, same.sqnr_db, same.max_abs, same.cosine) == (0.0, math.inf, 0.0, 1.0)
    W = torch.ones(3, 4)
    assert compare(W, W).sqnr_db == math.inf
    assert compare(W, -W).cosine == pytest.approx(-1.0)
    bad = W.clone()
    bad[1, 2] = float("nan")
    assert math.isnan(compare(W, bad).max_abs)
    assert math.isnan(frobenius_norm(bad))
    bad[1, 2] = float("inf")
    assert not math.isfinite(frobenius_norm(bad))
    with pytest.raises(ValueError, match="shapes differ"):
        compare(W, torch.ones(4, 3))


def test_logit_agreement() -> None:
    from compress.metrics import logit_agreement

    a = torch.randn(16, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    same = logit_agreement(a, a.clone())
    assert same["max_abs"] == 0 and same["argmax"] == 1 and same["kl_max"] == 0 and same["positions"] == 16
    assert abs(same["corr_min"] - 1) < 1e-12
    shifted = logit_agreement(a, a + 2.0)  # a constant shift changes no probability
    assert abs(shifted["rel_max"] - 2.0 / float(a.std())) < 1e-9 and shifted["kl_max"] < 1e-12
    assert shifted["argmax"] == 1 and abs(shifted["corr_min"] - 1) < 1e-12
    flipped = logit_agreement(a, -a)
    assert flipped["corr_mean"] < -0.99 and flipped["argmax"] < 0.2 and flipped["kl_mean"] > 0


@pytest.mark.parametrize("size", [7, 3_000_001])  # one slice, and several with a shorter last one
def test_streamed_comparison_equals_compare(size: int) -> None:
    """compare_stream (W' in pieces of any length) gives compare's figures bit for bit, and an exact
    reconstruction gives max_abs +0.0 (reports print it; -0.0 would read '-0')."""
    from compress.metrics import compare_stream

    gen = torch.Generator().manual_seed(size)
    W = torch.randn(size, generator=gen)
    W_hat = W + 0.01 * torch.randn(size, generator=gen)
    pieces = [W_hat[i:i + 999_983] for i in range(0, size, 999_983)]  # boundaries that are not the slices'
    assert compare_stream(W, pieces) == compare(W, W_hat)
    assert compare_stream(W, pieces).max_abs == float((W - W_hat).abs().max())
    exact = compare(W, W.clone())
    assert exact.max_abs == 0.0 and math.copysign(1.0, exact.max_abs) == 1.0 and exact.rel_fro == 0.0
    assert compare(W, W.clone()).reference_finite and not compare(W.fill_(math.inf), W_hat).reference_finite
    with pytest.raises(ValueError, match="values given"):
        compare_stream(W, pieces[:-1])
