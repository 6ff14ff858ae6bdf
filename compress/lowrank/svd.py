"""Truncated SVD engines and rank selection for low-rank approximations of weight deltas.

Pure tensor math: float32 inside, no files, no device decisions (the caller's tensor decides).

- :func:`svd_exact`: ``torch.linalg.svd`` in float32, the whole spectrum.
- :func:`svd_randomized`: Halko, Martinsson & Tropp, "Finding structure with randomness" (2011),
  https://arxiv.org/abs/0909.4061, Algorithms 4.4 + 5.1: sample the range with a Gaussian test
  matrix of ``rank + oversample`` columns, sharpen it with ``n_iter`` power iterations (each
  re-orthonormalised by QR, which keeps small singular values from drowning in round-off), then
  take the exact SVD of the small projected matrix. Seeded, hence deterministic. The defaults
  (oversample 16, 6 iterations) are chosen for slowly decaying spectra, the hard case of real
  fine-tune deltas: on a 1024x2816 matrix with s_i ~ i^-0.5 at rank 32 they reach the optimal
  rank-r error to 1e-4 (2 iterations with oversample 8: +0.4%) at ~1/25 of the exact SVD's time.

Rank selection (:class:`RankRule`) needs the energy of the whole spectrum for the ``energy`` rule:
it is ``||dW||_F^2`` (the sum of all squared singular values), one pass over the matrix, so the
randomized engine never needs the full spectrum: the retained fraction of the top-r values is
``sum_{i<=r} s_i^2 / ||dW||_F^2``. Because every rule is capped by ``max_rank``, the top
``max_rank`` values always suffice. By Eckart-Young the best rank-r error is
``sqrt(||dW||_F^2 - sum_{i<=r} s_i^2)``.

Activation-aware factors (:func:`low_rank_whitened`, as ASVD / SVD-LLM whiten for compression): with S the
second moment of a layer's inputs and L its Cholesky factor, the SVD of dW L minimises the error of the layer's
*output* on those inputs instead of its weights. :func:`allocate_ranks` spends one parameter budget across
modules by singular value gained per stored parameter; :func:`error_curves` gives every truncation's error
without forming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress.metrics import frobenius_norm

ENGINES = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: a fixed ``rank``, the smallest rank whose retained energy
    reaches ``energy`` (0 < energy <= 1), or every value above ``sv_threshold``; always at most
    ``max_rank`` and at most min(out, in)."""

    rank: int | None = None
    energy: float | None = None
    sv_threshold: float | None = None
    max_rank: int = 256

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.rank, self.energy, self.sv_threshold)]
        if sum(given) != 1:
            raise ValueError("give exactly one of rank, energy or sv_threshold")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.sv_threshold is not None and not (self.sv_threshold >= 0 and math.isfinite(self.sv_threshold)):
            raise ValueError(f"singular-value threshold must be a finite number >= 0, got {self.sv_threshold}")
        if self.max_rank < 1:
            raise ValueError(f"max rank must be at least 1, got {self.max_rank}")

    def describe(self) -> str:
        """The rule in the command line's words, e.g. 'rank 16 (at most 256)'."""
        if self.rank is not None:
            what = f"rank {self.rank}"
        elif self.energy is not None:
            what = f"energy {self.energy:g}"
        else:
            what = f"singular values above {self.sv_threshold:g}"
        return f"{what} (at most {self.max_rank})"

    def upper_bound(self, shape: tuple[int, int]) -> int:
        """The most singular values this rule can keep for a matrix of ``shape``."""
        cap = min(self.max_rank, *shape)
        return min(cap, self.rank) if self.rank is not None else cap

    def choose(self, S: torch.Tensor, total_energy: float) -> int:
        """Pick r from the leading singular values ``S`` (descending) and ``||dW||_F^2``."""
        cap = min(self.max_rank, S.numel())
        if self.rank is not None:
            return min(self.rank, cap)
        if self.sv_threshold is not None:
            return min(int((self.sv_threshold < S).sum()), cap)
        assert self.energy is not None
        if total_energy <= 0:
            return 0
        retained = torch.cumsum(S.double() ** 2, 0) / total_energy
        # The float32 singular values and the float64 ||dW||^2 disagree by ~1e-7 relative, either way:
        # without a tolerance above that, energy=1.0 could never be reached and every value is kept.
        reached = (retained >= self.energy - 1e-6).nonzero()
        r = int(reached[0]) + 1 if reached.numel() else S.numel()
        return min(r, cap)


def svd_exact(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M: [m, n] -> U [m, k], S [k] (descending), Vh [k, n] with k = min(m, n); float32."""
    return torch.linalg.svd(M.float(), full_matrices=False)


def svd_randomized(M: torch.Tensor, rank: int, *, oversample: int = 16, n_iter: int = 6,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate leading ``rank`` singular triplets of M: [m, n] -> U [m, r], S [r], Vh [r, n]."""
    A = M.float()
    m, n = A.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=A.device, dtype=torch.float32)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(A.T @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    r = min(rank, S.numel())
    return (Q @ Ub)[:, :r], S[:r], Vh[:r]


# Matrices up to this size on their smaller side get the exact SVD under ``auto``: it takes well under a second
# there, and the randomized one, though close, kept measurably less of a real fine-tune at rank 64 (SmolLM2, 576).
EXACT_MAX_SIDE = 1024


def pick_engine(engine: str, shape: tuple[int, int], rank_bound: int) -> str:
    """``auto``: exact for matrices up to :data:`EXACT_MAX_SIDE` on their smaller side; beyond, randomized when the
    wanted rank is small next to the matrix (<= 1/4 of its smaller side), where it is many times faster at
    near-optimal error; exact otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"unknown SVD engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if min(shape) <= EXACT_MAX_SIDE:
        return "exact"
    return "randomized" if rank_bound * 4 <= min(shape) else "exact"


@dataclass
class LowRank:
    """dW ~ B @ A with A: [r, in], B: [out, r] (sqrt(S) on both sides, scaling 1)."""

    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor  # the kept ones, descending
    total_energy: float  # ||dW||_F^2
    engine: str

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def retained_energy(self) -> float:
        """sum of kept s_i^2 / ||dW||_F^2 (1.0 for an all-zero delta)."""
        if self.total_energy <= 0:
            return 1.0
        return min(float((self.singular_values.double() ** 2).sum()) / self.total_energy, 1.0)

    @property
    def eckart_young_rel_error(self) -> float:
        """Relative Frobenius error of the best rank-r approximation: sqrt(1 - retained energy)."""
        return math.sqrt(max(1.0 - self.retained_energy, 0.0))


def low_rank(dW: torch.Tensor, rule: RankRule, *, engine: str = "auto", oversample: int = 16, n_iter: int = 6,
             seed: int = 0, total_energy: float | None = None) -> LowRank:
    """Truncated SVD of dW: [out, in] (any float dtype; computed in float32) under ``rule``.

    ``total_energy`` is ||dW||_F^2 when the caller already has it (it is computed otherwise).
    """
    D = dW.float()
    shape = (D.shape[0], D.shape[1])
    total = frobenius_norm(D) ** 2 if total_energy is None else float(total_energy)
    bound = rule.upper_bound(shape)
    used = pick_engine(engine, shape, bound)
    if used == "exact":
        U, S, Vh = svd_exact(D)
    else:
        U, S, Vh = svd_randomized(D, bound, oversample=oversample, n_iter=n_iter, seed=seed)
    r = rule.choose(S, total)
    root = S[:r].sqrt()
    B = U[:, :r] * root.unsqueeze(0)
    A = root.unsqueeze(1) * Vh[:r]
    return LowRank(A=A.contiguous(), B=B.contiguous(), singular_values=S[:r].clone(), total_energy=total,
                   engine=used)


# --- activation-aware (whitened) low rank ---------------------------------------------------------------------


def whitening_factor(S: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor L of S + damp * mean(diag S) * I (S = X^T X / n: [in, in], the inputs' second moment),
    so that ||X M^T||_F^2 / n = ||M L||_F^2 for any M: [out, in]. Inputs no token used (zero diagonal) get a unit
    diagonal; the dampening grows tenfold until the factorisation succeeds. float32."""
    S = S.float().clone()
    diag = torch.diagonal(S)
    diag[diag == 0] = 1.0
    mean = float(diag.mean()) or 1.0
    eye = torch.eye(S.shape[0], device=S.device, dtype=S.dtype)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(S + damp * (10.0**attempt) * mean * eye)
        if int(info) == 0:
            return L
    raise ValueError("the input statistics are not positive definite even with strong dampening")


def activation_scaling(S: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD's diagonal scaling (Yuan et al. 2023): diag(S_jj^(alpha/2)) normalised to mean 1, [in, in] float32 -- each
    input column weighted by its activations' rms to the power alpha, their correlations ignored. Used in place of
    :func:`whitening_factor` by :func:`low_rank_whitened`."""
    d = torch.diagonal(S.float()).clamp(min=1e-30) ** (alpha / 2)
    return torch.diag(d / d.mean())


def low_rank_whitened(dW: torch.Tensor, L: torch.Tensor, rule: RankRule, *, engine: str = "auto",
                      oversample: int = 16, n_iter: int = 6, seed: int = 0) -> LowRank:
    """Activation-aware truncated SVD (ASVD / SVD-LLM's whitening): B A minimising ||(dW - B A) L||_F, the error of
    the layer's output on inputs whose second moment is L L^T (:func:`whitening_factor`), not of its weights.

    SVD of dW L = U diag(s) V^T; B = U_r sqrt(s_r), A = sqrt(s_r) V_r^T L^-1 (a triangular solve). dW: [out, in],
    L: [in, in] lower. Singular values, energies and the rank rule are those of dW L (output energy):
    ``eckart_young_rel_error`` is the relative *output* error of the kept rank."""
    D = dW.float()
    M = D @ L.float()
    lr = low_rank(M, rule, engine=engine, oversample=oversample, n_iter=n_iter, seed=seed)
    A = torch.linalg.solve_triangular(L.float(), lr.A, upper=False, left=False)  # A L = sqrt(s) V^T
    return LowRank(A=A.contiguous(), B=lr.B, singular_values=lr.singular_values, total_energy=lr.total_energy,
                   engine=lr.engine)


def allocate_ranks(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int,
                   max_rank: dict[str, int]) -> dict[str, int]:
    """Ranks for every module under one budget: each module first gets rank 1, then the rest of ``budget`` (in
    stored parameters) goes, one rank at a time, to the module whose next singular value removes the most error
    per parameter: s_{r+1}^2 / cost (``costs[m]`` = out + in, the parameters one rank adds; ``spectra[m]`` the
    module's singular values, descending, at least ``max_rank[m]`` of them unless the matrix is smaller).

    Since each module's gains fall with rank, taking the best ratios in order is the greedy knapsack; a module
    whose next rank no longer fits takes no more. ValueError when the budget cannot give every module rank 1."""
    floor = sum(costs[m] for m in spectra)
    if budget < floor:
        raise ValueError(f"the budget of {budget:,} parameters is below rank 1 everywhere ({floor:,})")
    ranks = {m: 1 for m in spectra}
    left = budget - floor
    candidates: list[tuple[float, str, int]] = []
    for m, s in spectra.items():
        top = min(max_rank[m], s.numel())
        gains = (s[1:top].double() ** 2 / costs[m]).tolist()
        candidates += [(g, m, i + 2) for i, g in enumerate(gains)]  # (gain per parameter, module, rank it makes)
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))  # deterministic order on ties
    closed: set[str] = set()
    for _, m, r in candidates:
        if m in closed or r != ranks[m] + 1:
            continue
        if costs[m] > left:
            closed.add(m)
            continue
        ranks[m] = r
        left -= costs[m]
    return ranks


def _error_curve(B: torch.Tensor, DMA: torch.Tensor, AA: torch.Tensor, total: float) -> list[float]:
    """sqrt(||M - sum_{i<=r} b_i a_i||^2 / total) for r = 1..rank in a (semi-)inner product <X, Y> under which
    ||M||^2 = total, <M, b_i a_i> = (b_i^T DMA_i) and <b_i a_i, b_j a_j> = (B^T B)_ij AA_ij. Sums in float64."""
    c = (B * DMA).sum(0).double()  # [r]
    G = ((B.T @ B) * AA).double()
    block = torch.cumsum(torch.cumsum(G, 0), 1).diagonal()  # sum_{i,j<=r} G_ij
    err2 = (total - 2 * torch.cumsum(c, 0) + block).clamp(min=0)
    return ((err2 / total).sqrt() if total > 0 else torch.zeros_like(err2)).tolist()


def error_curves(dW: torch.Tensor, lr: LowRank,
                 S: torch.Tensor | None = None) -> tuple[list[float], list[float] | None]:
    """The relative errors of B_r A_r (the first r ranks of ``lr``) for every r = 1..rank, without forming them:
    weight ||dW - B_r A_r||_F / ||dW||_F, and with S (the inputs' second moment [in, in]) output
    sqrt(tr((dW - B_r A_r) S (dW - B_r A_r)^T) / tr(dW S dW^T)).

    With b_i, a_i the columns of B and rows of A: ||M - sum_{i<=r} b_i a_i||^2 = ||M||^2 - 2 sum_{i<=r} c_i +
    sum_{i,j<=r} G_ij, c_i = b_i^T M a_i^T and G = (B^T B) * (A A^T) (elementwise); in the S-weighted norm,
    c_i = b_i^T dW S a_i^T and G = (B^T B) * (A S A^T). Sums in float64."""
    D, A, B = dW.float(), lr.A.float(), lr.B.float()
    weight = _error_curve(B, D @ A.T, A @ A.T, float((D.double() ** 2).sum()))
    if S is None:
        return weight, None
    Sf = S.float()
    AS = A @ Sf
    return weight, _error_curve(B, D @ AS.T, AS @ A.T, float(((D @ Sf) * D).sum(dtype=torch.float64)))


# --- grouped (QA-LoRA) low rank: an update constant inside each group of input channels ---------------------


def group_means(dW: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in/g]: the mean of each row over every group of ``g`` consecutive input channels."""
    out, n = dW.shape
    return dW.float().reshape(out, n // group_size, group_size).mean(-1)


def pooled_moment(S: torch.Tensor, group_size: int) -> torch.Tensor:
    """P^T S P [in/g, in/g] with P [in, in/g] the 0/1 pooling matrix: the second moment of the group sums of the
    inputs (what a group-constant update sees of them)."""
    k = S.shape[0] // group_size
    return S.float().reshape(k, group_size, k, group_size).sum((1, 3))


def low_rank_grouped(dW: torch.Tensor, group_size: int, rule: RankRule, *, S: torch.Tensor | None = None,
                     aware: str = "diagonal", damp: float = 0.01, engine: str = "auto", oversample: int = 16,
                     n_iter: int = 6, seed: int = 0) -> LowRank:
    """B A ~ M [out, in/g], a rank-r per-group update: dW [out, in] is approximated by expand(M), M[o, j] repeated
    over the g input channels of group j (a QA-LoRA adapter's dense delta, which folds into the zero points of a
    group-wise quantized weight with that group size or a divisor of it).

    Without S: the least weight error. ||dW - expand(M)||^2 = ||dW - expand(Mbar)||^2 + g ||Mbar - M||^2 with Mbar
    the group means, so M is the truncated SVD of sqrt(g) Mbar divided by sqrt(g); singular values and energies are
    those of sqrt(g) Mbar against ||dW||^2 (retained energy = the share of dW's energy the update represents).
    With S (the inputs' second moment [in, in]): ``aware='diagonal'`` scales Mbar's columns as
    :func:`activation_scaling` does, on the pooled moment; ``'whitened'`` gives the least output error
    ||X (dW - expand(M))^T||: M* = dW S P (P^T S P)^-1 (damped), factored in the metric of P^T S P."""
    D = dW.float()
    if D.shape[1] % group_size:
        raise ValueError(f"group size {group_size} does not divide the input size {D.shape[1]}")
    total = frobenius_norm(D) ** 2
    if S is None:
        root = math.sqrt(group_size)
        lr = low_rank(group_means(D, group_size) * root, rule, engine=engine, oversample=oversample, n_iter=n_iter,
                      seed=seed, total_energy=total)
        return LowRank(A=(lr.A / root).contiguous(), B=lr.B, singular_values=lr.singular_values,
                       total_energy=total, engine=lr.engine)
    Sp = pooled_moment(S, group_size)
    if aware == "diagonal":
        return low_rank_whitened(group_means(D, group_size), activation_scaling(Sp), rule, engine=engine,
                                 oversample=oversample, n_iter=n_iter, seed=seed)
    if aware != "whitened":
        raise ValueError(f"aware must be 'diagonal' or 'whitened', got {aware!r}")
    L = whitening_factor(Sp, damp)
    k = Sp.shape[0]
    DSP = (D @ S.float()).reshape(D.shape[0], k, group_size).sum(-1)  # dW S P: [out, in/g]
    M_star = torch.cholesky_solve(DSP.T, L).T  # dW S P (L L^T)^-1
    return low_rank_whitened(M_star, L, rule, engine=engine, oversample=oversample, n_iter=n_iter, seed=seed)


def grouped_error_curves(dW: torch.Tensor, lr: LowRank, group_size: int,
                         S: torch.Tensor | None = None) -> tuple[list[float], list[float] | None]:
    """As :func:`error_curves` for a grouped update: the relative errors of expand(B_r A_r) against dW [out, in],
    in weight and (with S) on the inputs, for every r = 1..rank; ``lr`` factors M [out, in/g]."""
    D, A, B = dW.float(), lr.A.float(), lr.B.float()
    out, k = D.shape[0], D.shape[1] // group_size
    group_sums = D.reshape(out, k, group_size).sum(-1)  # dW P: <dW, expand(b a)> = b^T dW P a^T
    weight = _error_curve(B, group_sums @ A.T, group_size * (A @ A.T), float((D.double() ** 2).sum()))
    if S is None:
        return weight, None
    Sf = S.float()
    DS = D @ Sf
    DSP = DS.reshape(out, k, group_size).sum(-1)
    ASp = A @ pooled_moment(Sf, group_size)
    return weight, _error_curve(B, DSP @ A.T, ASp @ A.T, float((DS * D).sum(dtype=torch.float64)))
