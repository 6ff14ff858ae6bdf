"""Calibration-free grid optimisation (``--algorithm optimize``): each group's scale and zero (INT4) or each
block's absmax (NF4/FP4) chosen to minimise the weight error, under the layout's own constraints.

RTN takes the grid from the extremes of each group and rounds to it; one outlier then stretches the grid for
the whole group. Here, per group (INT4) or block (NF4/FP4), with the error measured exactly as the loader
will reconstruct the weights (scale already rounded to its stored dtype, codes nearest on that grid):

1. candidates: the RTN grid, grids whose scale is RTN's enlarged by each factor of :data:`EXPAND` with the
   nearest integer zero and its neighbours (:data:`ZERO_SHIFTS`), or for NF4/FP4 absmax scaled by each factor of
   :data:`NF4_FACTORS`;
2. refinement: from the best candidate, a few rounds of least squares -- with the codes fixed, the scale (and
   offset) that minimise the error have a closed form -- each re-rounded to the stored precision, the codes
   chosen again, kept only where the group's error went down.

Every candidate must *cover* the group: its grid reaches the group's smallest and largest weight within half a
step (for NF4/FP4, half the table's outermost step), so no weight is clipped by more than rounding moves any
weight. The error-optimal grids clip the largest weights instead (a shrunk range, as clip searches choose), and
on SmolLM2 that lowers the weight error by 8 % yet raises perplexity above RTN's (measured: INT4 g128 22.0
against RTN's 20.1 on 4k tokens), while covering grids lower it (19.4): a model's largest weights matter more
than their share of the squared error says.

The search keeps the best grid per group, and the RTN grid is a candidate, evaluated with RTN's own
arithmetic, so every group's error (hence every tensor's) is at most RTN's; groups where nothing beat RTN
get RTN's codes bit for bit. ``importance`` ([in], non-negative per input column, e.g. mean squared
activations) weights the error: sum_j importance_j (w_j - w'_j)^2.

Layout constraints: INT4 scales are rounded to ``config.scale_dtype`` before the codes are chosen; zeros are
integers in 0..15 (gptq, compressed-tensors) or, with ``float_offset`` (the native layout), a float32
offset per group (W' = s q + m); symmetric INT4 keeps zero = 8. NF4/FP4: any float32 absmax per block
(bitsandbytes' loader multiplies the table value by it); with double quantization the codes are chosen
against the absmax as the 8-bit statistics decode it.

Cost: about 20 evaluations of the grid per group, each a handful of element-wise passes: ~4-6x RTN's
quantization time; per Linear weight still memory-bound chunk by chunk (rows a cache-sized block at a time).
"""

from __future__ import annotations

import torch

from compress.quant.base import check_float_matrix
from compress.quant.int4 import CHUNK_ELEMENTS, AffineInt4Tensor, Int4Config, Int4Tensor, _group_params, _round_scale
from compress.quant.nf4 import (
    NESTED_BLOCK_SIZE,
    TABLES,
    NF4Config,
    NF4Tensor,
    _nearest_codes,
    dequantize_blockwise_8bit,
    quantize_blockwise_8bit,
    quantize_nf4,
)

EXPAND = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12)  # scale factors above RTN's (1 + e) tried after RTN's
ZERO_SHIFTS = (-1.0, 1.0)  # integer zeros next to the nearest one
# absmax factors tried after RTN's 1.0: only wider ranges. Shrunk ones (0.9..0.975, still covering) never won on
# SmolLM2 (the same error to the last digit without them), and 2 least-squares rounds keep 99% of what 4 gain:
# -8.46% weight error against RTN where the old 8 factors and 4 rounds reached -8.52%, in 54% of the time.
NF4_FACTORS = (1.025, 1.05, 1.075, 1.1)
REFINE_ROUNDS = 4
NF4_REFINE_ROUNDS = 2


# --- INT4 ----------------------------------------------------------------------------------------------------
def _int_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Codes nearest to x on the grid s * (q - z): RTN's own arithmetic (round(x / s) + z, clamped)."""
    return torch.round(x / s.unsqueeze(-1)).add_(z.unsqueeze(-1)).clamp_(0, 15)


def _int_error(x: torch.Tensor, imp: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[R, G]: sum over each group of imp * (s (q - z) - x)^2 with the nearest codes q."""
    d = (_int_codes(x, s, z) - z.unsqueeze(-1)).mul_(s.unsqueeze(-1)).sub_(x)
    d = d.square_()
    if imp is not None:
        d.mul_(imp)
    return d.sum(-1)


def _covers(lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Whether the grid first, first + s, ..., first + 15 s reaches the group's extremes within half a step: no
    weight is clipped by more than rounding moves any weight."""
    return (first <= lo + s / 2) & (first + 15 * s >= hi - s / 2)


def _keep_better(best: list[torch.Tensor], err: torch.Tensor, *cand: torch.Tensor,
                 allowed: torch.Tensor | None = None) -> None:
    """Where ``err`` < best error (best = [err, *params]) and the candidate is ``allowed``, take its parameters."""
    better = err < best[0]  # NaN (a degenerate fit) never wins
    if allowed is not None:
        better &= allowed
    best[0] = torch.where(better, err, best[0])
    for i, c in enumerate(cand, start=1):
        best[i] = torch.where(better, c, best[i])


def _weighted_sums(x: torch.Tensor, imp: torch.Tensor | None, *terms: torch.Tensor) -> list[torch.Tensor]:
    """sum over each group of imp * t for each term t (imp = 1 when None)."""
    return [(t * imp if imp is not None else t).sum(-1) for t in terms]


def _search_int_zero(x: torch.Tensor, imp: torch.Tensor | None,
                     config: Int4Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (error, scale, integer zero) per group of x: [R, G, g]; starts from RTN's grid and only accepts grids
    that cover the group's extremes (:func:`_covers`)."""
    s0, z0 = _group_params(x, config)
    best = [_int_error(x, imp, s0, z0), s0, z0]
    lo = x.amin(dim=-1).clamp(max=0)
    hi = x.amax(dim=-1).clamp(min=0)
    span = torch.where(s0 > 0, s0, 1.0)  # RTN's scale, already at its stored precision
    for e in EXPAND:
        s = _round_scale(span * (1 + e), config.scale_dtype)
        z_near = torch.full_like(s, 8.0) if config.symmetric else torch.round(-lo / s).clamp_(0, 15)
        for dz in (0.0, *(() if config.symmetric else ZERO_SHIFTS)):
            z = (z_near + dz).clamp_(0, 15)
            _keep_better(best, _int_error(x, imp, s, z), s, z, allowed=_covers(lo, hi, s, -s * z))
    for _ in range(REFINE_ROUNDS):  # least squares with the codes fixed, kept only where it still covers
        _, s, z = best
        q = _int_codes(x, s, z)
        c = q - z.unsqueeze(-1)
        num, den = _weighted_sums(x, imp, x * c, c * c)
        s_new = _round_scale(num / den, config.scale_dtype)
        _keep_better(best, _int_error(x, imp, s_new, z), s_new, z, allowed=_covers(lo, hi, s_new, -s_new * z))
    return best[0], best[1], best[2]


def _affine_codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Codes nearest to x on the grid s q + m."""
    return torch.round((x - m.unsqueeze(-1)) / s.unsqueeze(-1)).clamp_(0, 15)


def _affine_error(x: torch.Tensor, imp: torch.Tensor | None, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    d = torch.addcmul(m.unsqueeze(-1), _affine_codes(x, s, m), s.unsqueeze(-1)).sub_(x).square_()
    if imp is not None:
        d.mul_(imp)
    return d.sum(-1)


def _refine_float_offset(x: torch.Tensor, imp: torch.Tensor | None, err: torch.Tensor, s: torch.Tensor,
                         z: torch.Tensor, config: Int4Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the best integer-zero grid, free the offset (float32 m) and refine (s, m) by least squares.
    Returns (use_float [R, G] bool, s, m): where use_float is False the integer grid stays (m = -s z)."""
    best = [err, s, -(s * z)]
    lo = x.amin(dim=-1).clamp(max=0)
    hi = x.amax(dim=-1).clamp(min=0)
    ones = torch.ones_like(x)
    for _ in range(REFINE_ROUNDS):
        _, s_cur, m_cur = best
        q = _affine_codes(x, s_cur, m_cur)
        n, sq, sx, sqq, sqx = _weighted_sums(x, imp, ones, q, x, q * q, q * x)
        s_new = _round_scale((n * sqx - sq * sx) / (n * sqq - sq * sq), config.scale_dtype)
        m_new = (sx - s_new * sq) / n  # the best offset for this (stored) scale and these codes
        _keep_better(best, _affine_error(x, imp, s_new, m_new), s_new, m_new,
                     allowed=_covers(lo, hi, s_new, m_new))
    return best[0] < err, best[1], best[2]


def optimize_int4(W: torch.Tensor, config: Int4Config, *, importance: torch.Tensor | None = None,
                  float_offset: bool = False) -> Int4Tensor | AffineInt4Tensor:
    """Group-wise INT4 of W: [out, in] with each group's grid searched (module docstring).

    importance: float32 [in] or None. Returns an :class:`Int4Tensor` (integer zeros), or with ``float_offset``
    an :class:`AffineInt4Tensor` (float32 offsets; not for symmetric configs).
    """
    check_float_matrix(W)
    if W.dim() != 2:
        raise ValueError(f"INT4 group-wise quantization needs a 2-D weight [out, in], got shape {tuple(W.shape)}")
    if float_offset and config.symmetric:
        raise ValueError("a float offset per group is an asymmetric grid; drop --sym")
    out_features, in_features = W.shape
    gs = config.group_size
    n_groups = -(-in_features // gs)
    codes = torch.empty((out_features, in_features), dtype=torch.uint8, device=W.device)
    scales = torch.empty((out_features, n_groups), dtype=torch.float32, device=W.device)
    zeros = torch.empty((out_features, n_groups), dtype=torch.float32, device=W.device)
    offsets = torch.empty((out_features, n_groups), dtype=torch.float32, device=W.device) if float_offset else None
    imp = None if importance is None else importance.to(W.device, torch.float32).reshape(-1)
    rows = max(CHUNK_ELEMENTS // max(in_features, 1), 1)
    full = in_features - in_features % gs
    segments = [(c0, c1) for c0, c1 in ((0, full), (full, in_features)) if c1 > c0]  # whole groups, last group
    for r0 in range(0, out_features, rows):
        r1 = min(r0 + rows, out_features)
        x = W[r0:r1].float()
        for c0, c1 in segments:
            width = min(gs, c1 - c0)
            xg = x[:, c0:c1].reshape(r1 - r0, -1, width)
            ig = None if imp is None else imp[c0:c1].reshape(-1, width)
            g0, g1 = c0 // gs, c0 // gs + xg.shape[1]
            err, s, z = _search_int_zero(xg, ig, config)
            q = _int_codes(xg, s, z)
            if offsets is not None:
                use_float, s_f, m_f = _refine_float_offset(xg, ig, err, s, z, config)
                q = torch.where(use_float.unsqueeze(-1), _affine_codes(xg, s_f, m_f), q)
                offsets[r0:r1, g0:g1] = torch.where(use_float, m_f, -(s * z))
                s = torch.where(use_float, s_f, s)
            codes[r0:r1, c0:c1] = q.reshape(r1 - r0, -1).to(torch.uint8)
            scales[r0:r1, g0:g1], zeros[r0:r1, g0:g1] = s, z
    if offsets is not None:
        return AffineInt4Tensor(shape=(out_features, in_features), dtype=W.dtype, codes=codes, scales=scales,
                                offsets=offsets, group_size=gs, scale_dtype=config.scale_dtype)
    return Int4Tensor(shape=(out_features, in_features), dtype=W.dtype, codes=codes, scales=scales,
                      zeros=zeros.to(torch.uint8), group_size=gs, symmetric=config.symmetric,
                      scale_dtype=config.scale_dtype)


# --- NF4 / FP4 -----------------------------------------------------------------------------------------------
def _table_error(x: torch.Tensor, imp: torch.Tensor | None, amax: torch.Tensor, table: torch.Tensor,
                 quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(error [B], codes [B, bs]) of blocks x: [B, bs] on the grid table * amax (nearest codes)."""
    q = _nearest_codes(x * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1), quant_type).reshape(x.shape)
    d = (table[q.long()] * amax.unsqueeze(1)).sub_(x).square_()
    if imp is not None:
        d.mul_(imp)
    return d.sum(-1), q


def _search_absmax(x: torch.Tensor, imp: torch.Tensor | None, quant_type: str) -> torch.Tensor:
    """Best absmax per block of x: [B, bs] (RTN's absmax first, then shrunk ranges, then least squares)."""
    table = torch.tensor(TABLES[quant_type], dtype=torch.float32, device=x.device)
    amax0 = x.abs().amax(dim=1)  # RTN's, 0 for an all-zero block as bitsandbytes stores it
    err0, _ = _table_error(x, imp, amax0, table, quant_type)
    best = [err0, amax0]
    # the extremes must stay within half of the table's outermost step of the grid's end (no deeper clipping)
    floor = amax0 * (1 - (1 - float(table.abs().sort().values[-2])) / 2)
    for p in NF4_FACTORS:
        a = amax0 * p
        _keep_better(best, _table_error(x, imp, a, table, quant_type)[0], a, allowed=a >= floor)
    for _ in range(NF4_REFINE_ROUNDS):
        _, q = _table_error(x, imp, best[1], table, quant_type)
        t = table[q.long()]
        num, den = _weighted_sums(x, imp, x * t, t * t)
        a = num / den
        _keep_better(best, _table_error(x, imp, a, table, quant_type)[0], a, allowed=a >= floor)
    return best[1]


def optimize_nf4(W: torch.Tensor, config: NF4Config, *, importance: torch.Tensor | None = None,
                 float_offset: bool = False) -> NF4Tensor:
    """NF4/FP4 of W (flattened row-major, blocks of ``block_size``) with each block's absmax searched.

    importance: float32 [W.shape[-1]] per column, or None; ``float_offset`` is ignored (the table has no
    offset; the argument keeps one signature for every optimiser). Same layout as
    :func:`~compress.quant.nf4.quantize_nf4`; blocks where RTN's absmax is best keep RTN's codes.
    """
    check_float_matrix(W)
    bs = config.block_size
    flat = W.reshape(-1)
    n = flat.numel()
    if n == 0:
        return quantize_nf4(W, config)
    n_blocks = -(-n // bs)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=W.device)
    col = None
    if importance is not None:  # per element: the importance of its column
        cols = W.shape[-1]
        col = importance.to(W.device, torch.float32).reshape(-1)
    step = max(CHUNK_ELEMENTS // bs, 1) * bs
    full = n - n % bs
    for start in range(0, full, step):
        stop = min(start + step, full)
        x = flat[start:stop].float().reshape(-1, bs)
        imp = None if col is None else col[torch.arange(start, stop, device=W.device) % cols].reshape(-1, bs)
        absmax[start // bs: stop // bs] = _search_absmax(x, imp, config.quant_type)
    if full < n:
        x = flat[full:].float().reshape(1, -1)
        imp = None if col is None else col[torch.arange(full, n, device=W.device) % cols].reshape(1, -1)
        absmax[-1] = _search_absmax(x, imp, config.quant_type)[0]
    return _nf4_with_absmax(W, absmax, config)


def _nf4_with_absmax(W: torch.Tensor, absmax: torch.Tensor, config: NF4Config) -> NF4Tensor:
    """The NF4Tensor of W with the given absmax per block (8-bit coded first with double quantization):
    codes nearest to W / absmax as the loader decodes it."""
    bs = config.block_size
    result = NF4Tensor(shape=tuple(W.shape), dtype=W.dtype, codes=torch.empty(0, dtype=torch.uint8),
                       absmax=absmax, block_size=bs, quant_type=config.quant_type)
    decoded = absmax
    if config.double_quant:
        offset = absmax.mean()
        q, nested_absmax, nested_code = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCK_SIZE)
        result.absmax, result.nested_absmax, result.nested_code = q, nested_absmax, nested_code
        result.offset = float(offset)
        decoded = (dequantize_blockwise_8bit(q, nested_absmax, nested_code, NESTED_BLOCK_SIZE) + result.offset)
    flat = W.reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=W.device)
    full = n - n % bs
    step = max(CHUNK_ELEMENTS // bs, 1) * bs
    for start in range(0, full, step):
        stop = min(start + step, full)
        x = flat[start:stop].float().reshape(-1, bs)
        inv = 1.0 / decoded[start // bs: stop // bs].clamp(min=1e-38)
        codes[start:stop] = _nearest_codes(x * inv.unsqueeze(1), config.quant_type)
    if full < n:  # the partial last block: bitsandbytes divides
        codes[full:] = _nearest_codes(flat[full:].float() / decoded[-1].clamp(min=1e-38), config.quant_type)
    result.codes = codes
    return result
