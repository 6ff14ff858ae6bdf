"""Combining several adapters into one update of a tensor, on dense deltas.

Every method takes the dense deltas ``d_k`` of one tensor (float32, all the same shape, in the
tensor's storage layout) and their weights ``w_k`` and returns one dense delta ``D`` of that shape.
Pure tensor math: no files, no devices chosen here (the deltas' device is used).

=======  ================================================================================
sum      ``D = sum_k w_k d_k``, the exact weighted sum (task arithmetic, Ilharco et al. 2023,
         https://arxiv.org/abs/2212.04089).
cat      Concatenated ranks: A' = rows ``w_k s_k A_k``, B' = columns ``B_k`` (rank r_1 + r_2 + ...),
         whose product B' A' *is* ``sum_k w_k s_k B_k A_k``: on dense deltas it equals ``sum``
         (:func:`cat_factors` gives the factors for writing one adapter). Unlike PEFT's ``linear``
         (which mixes A's and B's separately and adds cross terms B_j A_k) it is exact.
ties     TIES-merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each delta to
         its ``density`` fraction of largest magnitudes, elect per element the sign with the
         larger total magnitude, average only the (weighted) values that agree with it.
dare     DARE (Yu et al. 2023, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099):
         drop each element of each delta with probability ``p = 1 - density`` (seeded), rescale the
         survivors by ``1 / (1 - p)``, then sum with the weights.
svd      The exact weighted sum, re-compressed to its best rank-``rank`` approximation by a
         truncated SVD (Eckart-Young), as PEFT's ``svd`` combination does
         (:func:`compress.lowrank.svd.low_rank`).
=======  ================================================================================

``COMBINE_METHODS`` maps each name to a frozen config dataclass that validates itself in
``__post_init__`` (``ValueError`` with the option's name) and whose ``combine`` is the pure function.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from compress.catalog import COMBINE
from compress.lowrank.svd import ENGINES, RankRule, low_rank


def _check(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not deltas:
        raise ValueError("nothing to combine: no deltas")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    shape = tuple(deltas[0].shape)
    for d in deltas[1:]:
        if tuple(d.shape) != shape:
            raise ValueError(f"deltas have different shapes: {list(shape)} and {list(d.shape)}")


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k w_k d_k`` in float32 (a new tensor; the inputs are not modified)."""
    _check(deltas, weights)
    out = deltas[0].float() * weights[0]
    for d, w in zip(deltas[1:], weights[1:], strict=True):
        out.add_(d.float(), alpha=w)
    return out


def cat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate LoRA factors into one adapter of rank ``sum_k r_k`` with scaling 1.

    ``factors``: ``(A_k [r_k, in], B_k [out, r_k], scaling_k)``. Returns ``A' [sum r_k, in]`` (rows
    ``w_k * s_k * A_k``) and ``B' [out, sum r_k]`` (columns ``B_k``), so that
    ``B' @ A' = sum_k w_k s_k B_k A_k`` exactly in real arithmetic (float32 rounding differs from
    summing the products only in the order of additions).
    """
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} adapters but {len(weights)} weights")
    A = torch.cat([a.float() * (w * s) for (a, _, s), w in zip(factors, weights, strict=True)], dim=0)
    B = torch.cat([b.float() for _, b, _ in factors], dim=1)
    return A, B


def n_kept(numel: int, density: float) -> int:
    """How many elements a ``density`` fraction keeps: ``floor(density * numel)``, the count PEFT's
    and mergekit's magnitude pruning keep, so that TIES results agree with theirs."""
    return min(numel, int(density * numel))


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``n_kept(numel, density)`` elements of largest magnitude, zero the rest.

    Deterministic: among elements of equal magnitude at the threshold, the ones with lower flat
    index are kept (``torch.topk`` leaves that order unspecified).
    """
    flat = delta.reshape(-1)
    k = n_kept(flat.numel(), density)
    if k >= flat.numel():
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    mag = flat.abs()
    # The k-th largest magnitude is the (n - k + 1)-th smallest.
    threshold = torch.kthvalue(mag, flat.numel() - k + 1).values
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = (mag == threshold).nonzero().reshape(-1)[:missing]
        keep[at_threshold] = True
    return (flat * keep).reshape(delta.shape)


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708), with weights.

    1. Trim: each ``d_k`` keeps its ``density`` fraction of largest-magnitude elements
       (:func:`trim_by_magnitude`); ``t_k = w_k * trim(d_k)``.
    2. Elect sign: per element ``g = sign(sum_k t_k)``, the sign whose values have the larger total
       magnitude (the paper's rule); an exact tie elects +.
    3. Disjoint merge: per element the mean of the ``t_k`` whose sign equals ``g`` (zeros never
       count); 0 where none does.

    With all weights 1 this is the paper's merge of task vectors (its final scale lambda is a
    common factor on the weights). Weights are applied before the election, so a negative weight
    votes with the sign it gives its delta.
    """
    _check(deltas, weights)
    stacked = torch.stack([trim_by_magnitude(d.float(), density) * w for d, w in zip(deltas, weights, strict=True)])
    elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = torch.sign(stacked) == elected
    total = (stacked * agree).sum(dim=0)
    count = agree.sum(dim=0)
    return total / count.clamp(min=1).to(total.dtype)


def derive_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for delta ``index`` of tensor ``key``: independent streams per tensor and adapter
    that do not depend on the order in which tensors are processed."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_mask(shape: Sequence[int], density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) keep-mask (bool, CPU) from a CPU generator seeded with ``seed``, so the
    mask is the same whatever device the math later runs on."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density


def dare_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, *, seed: int,
               key: str) -> torch.Tensor:
    """DARE (Yu et al. 2023, arXiv 2311.03099): ``D = sum_k w_k * (mask_k * d_k) / density``.

    ``mask_k`` keeps each element with probability ``density`` (= 1 - drop rate p), drawn from
    :func:`dare_mask` with seed ``derive_seed(seed, key, k)``; rescaling by ``1 / density`` keeps the
    expectation of every element equal to ``d_k``.
    """
    _check(deltas, weights)
    out: torch.Tensor | None = None
    for k, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        if density >= 1:
            kept = d.float()
        else:
            mask = dare_mask(d.shape, density, derive_seed(seed, key, k)).to(d.device)
            kept = d.float() * mask / density
        out = kept * w if out is None else out.add_(kept, alpha=w)
    assert out is not None
    return out


def svd_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], rank: int, *, engine: str = "auto",
              seed: int = 0) -> torch.Tensor:
    """The best rank-``rank`` approximation (truncated SVD) of ``sum_k w_k d_k`` (2-D deltas)."""
    total = weighted_sum(deltas, weights)
    if total.dim() != 2:
        raise ValueError(f"svd needs 2-D deltas, got shape {list(total.shape)}")
    if rank >= min(total.shape):
        return total  # full rank: nothing to compress
    lr = low_rank(total, RankRule(rank=rank, max_rank=rank), engine=engine, seed=seed)
    return lr.B @ lr.A


# --- the registry -------------------------------------------------------------------------------


class CombineMethod(ABC):
    """A combination method's configuration; subclasses are frozen dataclasses."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    exact_sum: ClassVar[bool] = False  # True when the result is exactly the weighted sum of the deltas

    @abstractmethod
    def combine(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, key: str = "",
                ranks: Sequence[int | None] = ()) -> torch.Tensor:
        """Dense deltas ``d_k`` (one tensor, same shape) and weights -> one dense delta.

        ``key``: the tensor's name (seeds per-tensor randomness); ``ranks``: the LoRA rank behind each
        delta, None where the delta is not low-rank (full replacements, DoRA, biases).
        """

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}  # type: ignore[call-overload]

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in asdict(self).items() if v is not None)  # type: ignore[call-overload]
        return f"{self.name}({params})" if params else self.name


@dataclass(frozen=True)
class SumMethod(CombineMethod):
    name: ClassVar[str] = "sum"
    summary: ClassVar[str] = COMBINE["sum"].summary
    paper: ClassVar[str] = COMBINE["sum"].paper
    exact_sum: ClassVar[bool] = True

    def combine(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, key: str = "",
                ranks: Sequence[int | None] = ()) -> torch.Tensor:
        return weighted_sum(deltas, weights)


@dataclass(frozen=True)
class CatMethod(CombineMethod):
    name: ClassVar[str] = "cat"
    summary: ClassVar[str] = COMBINE["cat"].summary
    paper: ClassVar[str] = COMBINE["cat"].paper
    exact_sum: ClassVar[bool] = True

    def combine(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, key: str = "",
                ranks: Sequence[int | None] = ()) -> torch.Tensor:
        return weighted_sum(deltas, weights)


@dataclass(frozen=True)
class TiesMethod(CombineMethod):
    """``density``: fraction of each delta's elements kept by magnitude, in (0, 1]."""

    density: float = 0.5
    name: ClassVar[str] = "ties"
    summary: ClassVar[str] = COMBINE["ties"].summary
    paper: ClassVar[str] = COMBINE["ties"].paper

    def __post_init__(self) -> None:
        if not (0 < self.density <= 1):
            raise ValueError(f"--density must be in (0, 1], got {self.density}")

    def combine(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, key: str = "",
                ranks: Sequence[int | None] = ()) -> torch.Tensor:
        return ties_merge(deltas, weights, self.density)


@dataclass(frozen=True)
class DareMethod(CombineMethod):
    """``density``: probability that an element survives (1 - drop rate), in (0, 1]; ``seed``."""

    density: float = 0.5
    seed: int = 0
    name: ClassVar[str] = "dare"
    summary: ClassVar[str] = COMBINE["dare"].summary
    paper: ClassVar[str] = COMBINE["dare"].paper

    def __post_init__(self) -> None:
        if not (0 < self.density <= 1):
            raise ValueError(f"--density must be in (0, 1], got {self.density}")

    def combine(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, key: str = "",
                ranks: Sequence[int | None] = ()) -> torch.Tensor:
        return dare_merge(deltas, weights, self.density, seed=self.seed, key=key)


@dataclass(frozen=True)
class SvdMethod(CombineMethod):
    """``rank``: target rank (default: the largest rank among the deltas, as PEFT); ``engine`` and
    ``seed`` of the SVD. Tensors with a delta that is not low-rank (modules_to_save, DoRA, biases)
    are summed exactly: re-compressing a full-rank change to a LoRA rank is not what was asked."""

    rank: int | None = None
    engine: str = "auto"
    seed: int = 0
    name: ClassVar[str] = "svd"
    summary: ClassVar[str] = COMBINE["svd"].summary
    paper: ClassVar[str] = COMBINE["svd"].paper

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"--rank must be at least 1, got {self.rank}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown SVD engine {self.engine!r}; choose one of {', '.join(ENGINES)}")

    def target_rank(self, ranks: Sequence[int | None]) -> int | None:
        """The rank to compress to, or None when the deltas are not all low-rank."""
        if not ranks or any(r is None for r in ranks):
            return None
        return self.rank if self.rank is not None else max(r for r in ranks if r is not None)

    def combine(self, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, key: str = "",
                ranks: Sequence[int | None] = ()) -> torch.Tensor:
        rank = self.target_rank(ranks)
        if rank is None or deltas[0].dim() != 2:
            return weighted_sum(deltas, weights)
        return svd_merge(deltas, weights, rank, engine=self.engine, seed=self.seed)


COMBINE_METHODS: dict[str, type[CombineMethod]] = {
    m.name: m for m in (SumMethod, CatMethod, TiesMethod, DareMethod, SvdMethod)
}


def method_options(name: str) -> tuple[str, ...]:
    """The option names a method accepts (its dataclass fields)."""
    return tuple(f.name for f in fields(COMBINE_METHODS[name]))  # type: ignore[arg-type]


def make_combine(name: str, **options: Any) -> CombineMethod:
    """Build a method's config from options; None values mean "the method's default".

    ``ValueError`` for an unknown method, an option the method does not take, or a bad value.
    """
    if name not in COMBINE_METHODS:
        raise ValueError(f"unknown combine method {name!r}; choose one of {', '.join(COMBINE_METHODS)}")
    accepted = method_options(name)
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - set(accepted))
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to --combine {name}")
    return COMBINE_METHODS[name](**given)
