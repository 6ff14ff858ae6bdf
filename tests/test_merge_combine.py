"""Combine methods on tiny hand-computed cases (compress.merge.combine), plus PEFT's merge_utils as an
independent oracle where its definition coincides with ours."""

from __future__ import annotations

import pytest
import torch

from compress.merge.combine import (
    COMBINE_METHODS,
    CatMethod,
    DareMethod,
    SumMethod,
    SvdMethod,
    TiesMethod,
    cat_factors,
    dare_mask,
    dare_merge,
    derive_seed,
    make_combine,
    n_kept,
    ties_merge,
    trim_by_magnitude,
    weighted_sum,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


D1 = t([1.0, -2.0], [3.0, 0.5])
D2 = t([-1.0, -1.0], [2.0, -4.0])


# --- registry and configs ------------------------------------------------------------------------


def test_registry_names_papers_and_validation() -> None:
    assert list(COMBINE_METHODS) == ["sum", "cat", "ties", "dare", "svd"]
    for cls in COMBINE_METHODS.values():
        assert cls.summary and cls.paper.startswith("https://")
    assert COMBINE_METHODS["ties"].paper == "https://arxiv.org/abs/2306.01708"
    assert COMBINE_METHODS["dare"].paper == "https://arxiv.org/abs/2311.03099"
    assert SumMethod.exact_sum and CatMethod.exact_sum
    assert not (TiesMethod.exact_sum or DareMethod.exact_sum or SvdMethod.exact_sum)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--density"):
            TiesMethod(density=bad)
        with pytest.raises(ValueError, match="--density"):
            DareMethod(density=bad)
    with pytest.raises(ValueError, match="--rank"):
        SvdMethod(rank=0)
    with pytest.raises(ValueError, match="does not apply to --combine sum"):
        make_combine("sum", density=0.5)
    with pytest.raises(ValueError, match="unknown combine method"):
        make_combine("magic")
    assert make_combine("ties", density=None) == TiesMethod(density=0.5)  # None: the method's default
    assert make_combine("dare", density=0.3, seed=7).to_dict() == {"method": "dare", "density": 0.3, "seed": 7}
    assert make_combine("svd", rank=2).describe() == "svd(rank=2, engine=auto, seed=0)"
    with pytest.raises(ValueError, match="different shapes"):
        weighted_sum([D1, torch.zeros(3)], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 deltas but 1 weights"):
        weighted_sum([D1, D2], [1.0])


# --- sum and cat ---------------------------------------------------------------------------------


def test_sum_is_the_weighted_sum() -> None:
    # 0.7 * D1 + 0.3 * D2, by hand
    expected = t([0.7 - 0.3, -1.4 - 0.3], [2.1 + 0.6, 0.35 - 1.2])
    for method in (SumMethod(), CatMethod()):
        got = method.combine([D1, D2], [0.7, 0.3])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # inputs untouched
    assert torch.equal(D1, t([1.0, -2.0], [3.0, 0.5]))


def test_cat_factors_concatenate_ranks_and_equal_the_weighted_sum() -> None:
    A1, B1 = t([1.0, 2.0]), t([1.0], [0.0])  # rank 1: B1 @ A1 = [[1, 2], [0, 0]]
    A2, B2 = t([0.0, 1.0], [1.0, 0.0]), t([1.0, 0.0], [0.0, 2.0])  # rank 2: [[0, 1], [2, 0]]
    A, B = cat_factors([(A1, B1, 2.0), (A2, B2, 0.5)], [1.0, 3.0])
    assert A.shape == (3, 2) and B.shape == (2, 3)  # rank r1 + r2
    torch.testing.assert_close(A[0], t([2.0, 4.0])[0])  # w1 * s1 * A1 = 1 * 2 * A1
    torch.testing.assert_close(A[1:], 1.5 * A2)  # w2 * s2 * A2 = 3 * 0.5 * A2
    # 2 * [[1, 2], [0, 0]] + 1.5 * [[0, 1], [2, 0]] = [[2, 5.5], [3, 0]]
    torch.testing.assert_close(B @ A, t([2.0, 5.5], [3.0, 0.0]))
    dense = [(B1 @ A1) * 2.0, (B2 @ A2) * 0.5]
    torch.testing.assert_close(CatMethod().combine(dense, [1.0, 3.0]), B @ A)


# --- TIES ----------------------------------------------------------------------------------------


def test_trim_keeps_largest_magnitudes_deterministically() -> None:
    x = t([1.0, -2.0, 3.0, 0.5])
    torch.testing.assert_close(trim_by_magnitude(x, 0.5), t([0.0, -2.0, 3.0, 0.0]))
    # ties at the threshold: the lower flat index wins
    torch.testing.assert_close(trim_by_magnitude(t([1.0, -1.0, 1.0, 0.0]), 0.5), t([1.0, -1.0, 0.0, 0.0]))
    assert torch.equal(trim_by_magnitude(x, 1.0), x)
    assert n_kept(4, 0.5) == 2 and n_kept(10, 0.7) == 7 and n_kept(10, 0.25) == 2 and n_kept(3, 0.1) == 0
    assert not trim_by_magnitude(t([1.0, 2.0, 3.0]), 0.1).any()


def test_ties_hand_computed() -> None:
    d1 = t([1.0, -2.0, 3.0, 0.5])
    d2 = t([-1.0, -1.0, 2.0, -4.0])
    # trim 50%: d1 -> [0, -2, 3, 0]; d2 -> [0, 0, 2, -4]
    # elected sign of the sums [0, -2, 5, -4]: [+, -, +, -] (0 elects +, but nothing is left there)
    # disjoint mean: [0, -2, (3 + 2) / 2, -4]
    torch.testing.assert_close(ties_merge([d1[0], d2[0]], [1.0, 1.0], 0.5), t([0.0, -2.0, 2.5, -4.0])[0])
    # weights apply before the election: 3 * [0, -2, 3, 0] and 1 * [0, 0, 2, -4]
    # sums [0, -6, 11, -4] -> mean of the agreeing values: [0, -6, (9 + 2) / 2, -4]
    got = TiesMethod(density=0.5).combine([d1[0], d2[0]], [3.0, 1.0])
    torch.testing.assert_close(got, t([0.0, -6.0, 5.5, -4.0])[0])
    # disagreeing signs are dropped, not averaged: +1 and -3 elect -, result -3 (not -1)
    torch.testing.assert_close(ties_merge([t([1.0]), t([-3.0])], [1.0, 1.0], 1.0), t([-3.0]))
    # an exact tie elects +
    torch.testing.assert_close(ties_merge([t([2.0]), t([-2.0])], [1.0, 1.0], 1.0), t([2.0]))


def test_ties_matches_peft_merge_utils_with_unit_weights() -> None:
    from peft.utils.merge_utils import ties

    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(16, 24, generator=gen) for _ in range(3)]
    ours = ties_merge(deltas, [1.0, 1.0, 1.0], 0.3)
    theirs = ties(deltas, torch.ones(3), 0.3, "total")
    # both keep floor(0.3 * 384) = 115 elements per delta
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# --- DARE ----------------------------------------------------------------------------------------


def test_dare_drops_and_rescales_seeded() -> None:
    d = torch.arange(1.0, 2001.0).reshape(40, 50)
    out = DareMethod(density=0.25, seed=3).combine([d], [1.0], key="layer.weight")
    kept = out != 0
    # survivors are rescaled by 1 / density = 4 exactly; dropped ones are 0
    torch.testing.assert_close(out[kept], d[kept] * 4.0, rtol=0, atol=0)
    assert abs(kept.float().mean().item() - 0.25) < 0.03  # 2000 Bernoulli(0.25) draws: std 0.0097
    # the mask is the documented one: Bernoulli(density) from derive_seed(seed, key, index)
    assert torch.equal(kept, dare_mask((40, 50), 0.25, derive_seed(3, "layer.weight", 0)))
    # deterministic, and independent per tensor name, adapter index and seed
    assert torch.equal(out, DareMethod(density=0.25, seed=3).combine([d], [1.0], key="layer.weight"))
    assert not torch.equal(out, DareMethod(density=0.25, seed=3).combine([d], [1.0], key="other.weight"))
    assert not torch.equal(out, DareMethod(density=0.25, seed=4).combine([d], [1.0], key="layer.weight"))
    two = dare_merge([d, d], [1.0, 1.0], 0.25, seed=3, key="layer.weight")
    assert not torch.equal(two, 2 * out)  # the second adapter gets its own mask
    # density 1 drops nothing: the weighted sum
    got = DareMethod(density=1.0).combine([D1, D2], [0.7, 0.3])
    torch.testing.assert_close(got, weighted_sum([D1, D2], [0.7, 0.3]))


def test_dare_is_unbiased() -> None:
    d = t([1.0, -2.0, 3.0, 0.5])
    mean = torch.stack([dare_merge([d], [2.0], 0.5, seed=s, key="k") for s in range(4000)]).mean(dim=0)
    # E[2 * mask * d / 0.5] = 2 d; per-element std of the mean: 2 |d| / sqrt(4000) <= 0.095
    torch.testing.assert_close(mean, 2 * d, rtol=0, atol=0.3)


# --- SVD -----------------------------------------------------------------------------------------


def test_svd_recompresses_the_sum_to_its_best_rank() -> None:
    d1 = torch.diag(t([3.0, 0.0, 0.0])[0])
    d2 = torch.diag(t([0.0, 1.0, 0.5])[0])
    # sum = diag(3, 1, 0.5); best rank 1 = diag(3, 0, 0); rank 2 = diag(3, 1, 0)
    for engine in ("exact", "randomized"):
        torch.testing.assert_close(SvdMethod(rank=1, engine=engine).combine([d1, d2], [1.0, 1.0], ranks=[1, 2]),
                                   torch.diag(t([3.0, 0.0, 0.0])[0]), rtol=0, atol=1e-5)
    # default rank: the largest adapter rank (PEFT's default), here 2
    torch.testing.assert_close(SvdMethod().combine([d1, d2], [1.0, 1.0], ranks=[1, 2]),
                               torch.diag(t([3.0, 1.0, 0.0])[0]), rtol=0, atol=1e-5)
    # a delta that is not low-rank (ranks None): the exact weighted sum
    torch.testing.assert_close(SvdMethod(rank=1).combine([d1, d2], [1.0, 1.0], ranks=[1, None]), d1 + d2)
    # 1-D deltas (biases) are summed
    torch.testing.assert_close(SvdMethod(rank=1).combine([t([1.0, 2.0])[0]], [2.0], ranks=[1]), t([2.0, 4.0])[0])


def test_svd_matches_peft_svd_combination() -> None:
    """PEFT's add_weighted_adapter(combination_type='svd') takes the same truncated SVD of the
    task-arithmetic sum; U_r S_r Vh_r is unique for distinct singular values."""
    from peft.utils.merge_utils import task_arithmetic

    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(12, 3, generator=gen) @ torch.randn(3, 20, generator=gen) for _ in range(2)]
    total = task_arithmetic(deltas, torch.tensor([0.6, 0.4]))
    U, S, Vh = torch.linalg.svd(total, full_matrices=True)
    theirs = (U[:, :4] @ torch.diag(S[:4])) @ Vh[:4]
    ours = SvdMethod(rank=4, engine="exact").combine(deltas, [0.6, 0.4], ranks=[3, 3])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
