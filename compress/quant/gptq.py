"""GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323): round a weight column by column onto a fixed grid,
spreading each column's rounding error over the columns not yet rounded so that the layer's output on the
calibration inputs moves as little as possible.

With X the calibration inputs of a Linear (rows = tokens) and H = X^T X [in, in], the output error of W' is
||X (W - W')^T||_F^2 = tr((W - W') H (W - W')^T). GPTQ minimises it greedily: with U the upper Cholesky factor of
H^-1 (after dampening H += damp * mean(diag H) * I), rounding column j to q_j leaves the error
e_j = (w_j - q_j) / U[j, j], and subtracting e_j U[j, k] from every later column k is the optimal correction.
Columns are processed in blocks of ``block_size`` (corrections inside a block at once, to later blocks as one
matrix product), as in the reference implementation.

The grid is fixed before any column is rounded (:class:`Grid`: the codes' scale and zero per element, chosen by
:mod:`compress.quant.optimize` on the original weights), so the stored parameters are exactly the layout's own
and any loader reconstructs ``grid.value(codes)``. ``order`` processes columns in another order (act-order:
decreasing diag(H), the inputs with the most energy first, while their errors can still be compensated); the
groups stay those of the grid ("static groups"), so every layout can hold the result.

Pure: float32 on the device of W, returns uint8 codes in the original column order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from compress.quant.base import QuantizedTensor
from compress.quant.int4 import AffineInt4Tensor, Int4Tensor
from compress.quant.nf4 import TABLES, NF4Tensor, _nearest_codes

GPTQ_BLOCK = 128


@dataclass(frozen=True)
class GPTQConfig:
    """``damp``: dampening as a fraction of the mean diagonal of H; ``act_order``: process columns by decreasing
    diag(H); ``block_size``: columns whose corrections are applied together."""

    damp: float = 0.01
    act_order: bool = False
    block_size: int = GPTQ_BLOCK

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"GPTQ dampening must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"GPTQ block size must be positive, got {self.block_size}")


# Round one column onto the fixed grid: (original column index j, w [out] float32) -> (codes [out], values [out]).
ColumnRounder = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float32 [in, in]. Inputs no token ever used
    (zero diagonal) get a unit diagonal; the dampening grows tenfold until the factorisation succeeds."""
    H = H.float().clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean()) or 1.0
    for attempt in range(6):
        lam = damp * (10.0**attempt) * mean
        L, info = torch.linalg.cholesky_ex(H + lam * torch.eye(H.shape[0], device=H.device, dtype=H.dtype))
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("the calibration statistics are not positive definite even with strong dampening")


def gptq_round(W: torch.Tensor, H: torch.Tensor, round_column: ColumnRounder,
               config: GPTQConfig = GPTQConfig()) -> torch.Tensor:
    """Codes uint8 [out, in] for W: [out, in] given H: [in, in] and the grid's column rounder (module docstring)."""
    out_features, in_features = W.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected [{in_features}, {in_features}] for W "
                         f"{tuple(W.shape)}")
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if config.act_order else None
    Wt = W.float().t().contiguous()  # [in, out]: one column of W is one contiguous row here
    Hk = H.float()
    if order is not None:
        Wt, Hk = Wt[order].contiguous(), Hk[order][:, order]
    columns = order.tolist() if order is not None else list(range(in_features))
    U = inverse_factor(Hk, config.damp)
    codes_t = torch.empty((in_features, out_features), dtype=torch.uint8, device=W.device)  # processing order
    for b0 in range(0, in_features, config.block_size):
        b1 = min(b0 + config.block_size, in_features)
        block = Wt[b0:b1].clone()
        errors = torch.empty_like(block)
        Ub = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            w = block[i]
            q, value = round_column(columns[b0 + i], w)
            codes_t[b0 + i] = q
            err = (w - value).div_(Ub[i, i])
            if i + 1 < b1 - b0:
                block[i + 1:].addr_(Ub[i, i + 1:], err, alpha=-1.0)
            errors[i] = err
        if b1 < in_features:
            Wt[b1:].sub_(U[b0:b1, b1:].t() @ errors)
    if order is not None:
        codes_t = codes_t[torch.argsort(order)]
    return codes_t.t().contiguous()


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W - W')^T||_F / ||X W^T||_F from H = X^T X: the relative error of the layer's output on the calibration
    inputs (products in float32, sums in float64)."""
    return output_errors(W, [W_hat], H)[0]


def output_errors(W: torch.Tensor, candidates: list[torch.Tensor], H: torch.Tensor) -> list[float]:
    """:func:`output_error` of each candidate W' of W (the denominator, one [out, in] x [in, in] product, once)."""
    Hf, Wf = H.float(), W.float()
    den = float(((Wf @ Hf) * Wf).sum(dtype=torch.float64))
    errors = []
    for W_hat in candidates:
        D = Wf - W_hat.float()
        num = float(((D @ Hf) * D).sum(dtype=torch.float64))
        errors.append((max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0)
    return errors


# --- the grids of the layouts ---------------------------------------------------------------------------------
def int4_rounder(grid: Int4Tensor) -> ColumnRounder:
    """Nearest codes on an INT4 grid with integer zeros: q = clamp(round(w / s) + z, 0, 15), value s (q - z)."""
    scales_t = grid.scales.t().contiguous()  # [groups, out]: one group's parameters contiguous
    zeros_t = grid.zeros.t().float().contiguous()
    gs = grid.group_size

    def round_column(j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = scales_t[j // gs], zeros_t[j // gs]
        q = torch.round(w / s).add_(z).clamp_(0, 15)
        return q.to(torch.uint8), (q - z) * s

    return round_column


def affine_rounder(grid: AffineInt4Tensor) -> ColumnRounder:
    """Nearest codes on an INT4 grid with float offsets: q = clamp(round((w - m) / s), 0, 15), value s q + m."""
    scales_t = grid.scales.t().contiguous()
    offsets_t = grid.offsets.t().contiguous()
    gs = grid.group_size

    def round_column(j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, m = scales_t[j // gs], offsets_t[j // gs]
        q = torch.round((w - m) / s).clamp_(0, 15)
        return q.to(torch.uint8), torch.addcmul(m, q, s)

    return round_column


def table_rounder(grid: NF4Tensor) -> ColumnRounder:
    """Nearest codes on an NF4/FP4 grid: the element's block absmax (as the loader decodes it) times the table."""
    out_features, in_features = grid.shape[0], math.prod(grid.shape[1:])
    absmax = grid.absmax_float()
    table = torch.tensor(TABLES[grid.quant_type], dtype=torch.float32, device=absmax.device)
    rows = torch.arange(out_features, device=absmax.device) * in_features
    bs = grid.block_size

    def round_column(j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = absmax[(rows + j) // bs]
        q = _nearest_codes(w * (1.0 / a.clamp(min=1e-38)), grid.quant_type)
        return q, table[q.long()] * a

    return round_column


def gptq_act_order_groups(W: torch.Tensor, H: torch.Tensor, make_grid: Callable[[torch.Tensor], Int4Tensor],
                          config: GPTQConfig = GPTQConfig()) -> Int4Tensor:
    """GPTQ with act-order groups (GPTQ's ``desc_act``, for the gptq layout): the input channels are taken by
    decreasing diag(H) and cut into consecutive groups *in that order*, so each group holds channels of similar
    energy; ``make_grid`` chooses the grid of W with its columns in that order (e.g. the optimiser), GPTQ rounds
    in that order, and the result names each channel's group by ``g_idx`` (channel c is in group rank(c) // G)."""
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    rank = torch.argsort(order)  # position of each channel in the processing order
    Wp, Hp = W[:, order], H[order][:, order]
    grid = make_grid(Wp)
    codes = gptq_round(Wp, Hp, int4_rounder(grid), replace(config, act_order=False))
    return replace(grid, codes=codes[:, rank].contiguous(), g_idx=(rank // grid.group_size).to(W.device))


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: QuantizedTensor,
                  config: GPTQConfig = GPTQConfig()) -> QuantizedTensor:
    """GPTQ of W: [out, in] onto ``grid`` (an INT4, affine INT4 or NF4/FP4 tensor of W whose parameters are kept):
    the same tensor type with GPTQ's codes."""
    if isinstance(grid, Int4Tensor):
        rounder = int4_rounder(grid)
    elif isinstance(grid, AffineInt4Tensor):
        rounder = affine_rounder(grid)
    elif isinstance(grid, NF4Tensor):
        rounder = table_rounder(grid)
    else:
        raise TypeError(f"GPTQ has no grid for {type(grid).__name__}")
    codes = gptq_round(W.reshape(W.shape[0], -1), H, rounder, config)
    if isinstance(grid, NF4Tensor):
        codes = codes.reshape(-1)
    return replace(grid, codes=codes)
