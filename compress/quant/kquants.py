"""llama.cpp's K-quants Q4_K, Q5_K and Q6_K, byte-identical to ``quantize_row_q{4,5,6}_K_ref``.

Reference: llama.cpp ``ggml/src/ggml-quants.c`` (``make_qkx2_quants``, ``make_qx_quants``,
``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``, ``quantize_row_q6_K_ref``): what
``llama-quantize`` runs when no importance matrix is given. Rows are cut into super-blocks of 256.

    Q4_K / Q5_K: 8 sub-blocks of 32, x ~ d_j * q - m_j with q in 0..15 (0..31). Per sub-block, weights
      w = sqrt(mean(x^2)) + |x| and a search over 21 (16) candidate scales, each refitted by weighted
      least squares for scale and minimum (``make_qkx2_quants``), picks the smallest weighted squared
      error. The 8 scales and 8 minimums are then quantized to 6 bits against the super-block's
      largest (fp16 ``d``, ``dmin``), and the codes recomputed with the rounded scales.
    Q6_K: 16 sub-blocks of 16, x ~ d_j * (q - 32), q in 0..63; per sub-block a search over 19
      candidate scales by x^2-weighted least squares (``make_qx_quants``, rmse_type 1); the scales are
      stored as int8 against the fp16 super-block scale ``d``.

Exactness: every float32 operation is done in the reference's order. Element-wise steps are
vectorised over all sub-blocks at once; the reference's running sums (``sum += w * x``) are
accumulated column by column, in order, never with a tree reduction (whose rounding differs). The
reference is compiled without FMA contraction (checked: the x86-64 ``libggml-base`` has no FMA
instructions), so ``a*b + c`` rounds twice here too. ``nearest_int`` (adding 1.5 * 2^23) is
round-half-to-even, which ``torch.round`` is. ``sqrtf`` is taken in float64 and rounded once (float32
``torch.sqrt`` is off by an ulp for some inputs).

With an importance matrix (``importance``: one weight per column, llama.cpp's ``quant_weights``), the
types follow ``quantize_row_q{4,5,6}_K_impl`` instead, what ``ggml_quantize_chunk`` runs when given an
imatrix:

    Q4_K / Q5_K: weights importance * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2) over the super-block;
      per sub-block ``make_qkx3_quants`` (the same search as make_qkx2 with 37 candidates, rmin -0.9, rdelta
      0.05); the 8 scales and 8 minimums are quantized to 6 bits by ``make_qp_quants`` (a search over 9
      super-block scales and up to 5 sweeps that move one 6-bit code at a time), weighted by the sub-blocks'
      summed weights, then the codes recomputed from the stored values. Q4_K keeps a 6-bit code's raw byte
      (C's uint8_t wrap), Q5_K clamps it to 63, both as the C.
    Q6_K: ``make_qx_quants`` weighted by the importance itself (no sigma2 term), else as the reference.

Block bytes (little-endian), super-blocks in row-major order:

    Q4_K (144): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    Q5_K (176): fp16 d, fp16 dmin, 12 bytes of scales and mins, 32 bytes of high bits, 128 of nibbles
    Q6_K (210): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, fp16 d

Cost: 21 candidate scales, each a dozen element-wise passes plus 32-step running sums over the
sub-blocks; a 4096x4096 Q4_K takes 3.2 s on one core, 2x llama.cpp's C (reports/bench_kquants.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.ggml_types import GGML_TYPE_IDS, K_TYPES, QK_K, TYPE_SIZES
from compress.quant.base import QuantizedTensor, check_float_matrix

GROUP_MAX_EPS = 1e-15
CHUNK_SUPERBLOCKS = 1 << 10  # 1024 super-blocks (1 MiB of float32) per step: measured fastest on one core


@dataclass
class KQuantTensor(QuantizedTensor):
    """A tensor in a K-quant type, held as its GGUF bytes: ``blocks`` uint8 [n_superblocks, type_size]."""

    blocks: torch.Tensor
    qtype: str

    @property
    def n_blocks(self) -> int:
        return self.numel // QK_K

    @property
    def ggml_type_id(self) -> int:
        return GGML_TYPE_IDS[self.qtype]

    def storage_bits(self) -> int:
        return 8 * TYPE_SIZES[self.qtype] * self.n_blocks

    def packed(self) -> torch.Tensor:
        """The GGUF bytes: uint8 ``[*shape[:-1], shape[-1] // 256 * type_size]``."""
        return self.blocks.reshape(*self.shape[:-1], self.shape[-1] // QK_K * TYPE_SIZES[self.qtype])

    def to_bytes(self) -> bytes:
        return self.packed().cpu().numpy().tobytes()

    def _fp16(self, start: int, blocks: torch.Tensor | None = None) -> torch.Tensor:
        b = self.blocks if blocks is None else blocks
        return b[:, start:start + 2].contiguous().view(torch.float16).squeeze(1)

    def scales_finite(self) -> bool:
        """Whether the fp16 super-block scales are finite (false for NaN/inf weights or overflow)."""
        if self.qtype == "q6_k":
            return bool(torch.isfinite(self._fp16(208)).all())
        return bool(torch.isfinite(self._fp16(0)).all() and torch.isfinite(self._fp16(2)).all())

    @property
    def chunk_unit(self) -> int:
        return QK_K

    def dequantize_range(self, start: int, stop: int) -> torch.Tensor:
        """x' in float32 as llama.cpp's ``dequantize_row_*`` computes it."""
        b = self.blocks[start // QK_K: stop // QK_K]
        if self.qtype == "q6_k":
            d = self._fp16(208, b).float()
            scales = b[:, 192:208].view(torch.int8).float()  # [n, 16]
            q = _unpack_q6(b[:, :128], b[:, 128:192]).to(torch.int16) - 32  # [n, 256]
            out = (d.unsqueeze(1) * scales).repeat_interleave(16, dim=1) * q.float()
        else:
            d, dmin = self._fp16(0, b).float(), self._fp16(2, b).float()
            sc, m = _unpack_scale_min(b[:, 4:16])  # [n, 8] each
            if self.qtype == "q4_k":
                q = _unpack_nibbles(b[:, 16:144])
            else:
                q = _unpack_nibbles(b[:, 48:176]) | (_unpack_high_bits(b[:, 16:48]) << 4)
            scale = (d.unsqueeze(1) * sc.float()).repeat_interleave(32, dim=1)
            offset = (dmin.unsqueeze(1) * m.float()).repeat_interleave(32, dim=1)
            out = scale * q.float() - offset
        return out.reshape(-1)


# --- the reference's arithmetic ------------------------------------------------------------------------


def _running_sum(terms: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``s = start; for i: s += terms[i]`` in float32, in order (``start`` None: begin at 0.0).

    ``terms`` is element-major, [n, N]: row i holds element i of every sub-block, so each step adds one
    contiguous row (the search functions below keep that layout throughout for this reason)."""
    total = torch.zeros_like(terms[0]) if start is None else start.clone()
    for row in terms:
        total.add_(row)
    return total


def _over(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """``numerator / t`` as one IEEE float32 division (``63.0 / t`` in torch is ``63 * (1 / t)``: two roundings)."""
    return torch.full_like(t, numerator) / t


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int``: round half to even (exact for |v| < 2^22), as float32."""
    return torch.round(v)


def _nearest_int_exact(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int`` bit for bit for every float32, as int32: ``v + 1.5 * 2^23``, whose low 23 bits
    minus 2^22 are the result. Equals round-half-even for |v| < 2^22 and wraps like the C beyond (used where
    the reference's argument is not bounded by the search)."""
    return (v + 12582912.0).view(torch.int32).bitwise_and(0x007FFFFF).sub_(0x00400000)


def _first_min(x: torch.Tensor) -> torch.Tensor:
    """``min = x[0]; for i: if (x[i] < min) min = x[i]; if (min > 0) min = 0`` per column of x [n, N], with the
    sign of a zero minimum as the C gets it (the first zero of the column): it reaches Q4_1/Q5_1's stored m."""
    amin = x.amin(dim=0)
    mn = torch.where(amin > 0, torch.zeros_like(amin), amin)
    ties = (amin == 0).nonzero().squeeze(1)
    if ties.numel():
        cols = x[:, ties]
        first = (cols == 0).to(torch.uint8).argmax(dim=0, keepdim=True)
        mn[ties] = torch.gather(cols, 0, first).squeeze(0)
    return mn


def _make_qkx2(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
               nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` (use_mad false) on sub-blocks given element-major: x, weights [n, N] float32
    (column k is sub-block k). With weights given, ``make_qkx3_quants`` is the same computation (its
    ``max <= min`` test equals ``max == min`` once min <= 0): the imatrix paths call this with
    (rmin, rdelta, nstep) = (-0.9, 0.05, 36).

    Returns codes L [n, N] (float32 holding 0..nmax), scale [N] and the_min [N] (x ~ scale * L - the_min).
    """
    f32 = torch.float32
    mn = _first_min(x)  # if (min > 0) min = 0
    mx = x.amax(dim=0)
    sum_w = _running_sum(weights[1:], weights[0])
    sum_x = _running_sum(weights[1:] * x[1:], weights[0] * x[0])
    flat = mx == mn  # then L = 0, the_min = -min, scale 0
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _over(float(nmax), span)
    scale = _over(1.0, iscale)
    L = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = (scale * L + mn) - x
    best_error = _running_sum(weights * diff.mul_(diff))
    best_scale, best_min = scale, mn.clone()
    # the codes of the best candidate are rebuilt at the end from its (iscale, min): cheaper than keeping them
    code_iscale, code_min = iscale, mn
    for step in range(nstep + 1):
        # the reference's loop reads ``min`` after each improvement: later candidates start from the refitted
        # minimum (span and shift move with it)
        span = torch.where(flat, torch.ones_like(mx), mx - best_min)
        numerator = torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * float(step)
        iscale = (numerator + float(nmax)) / span
        Laux = _nearest_int(torch.sub(x, best_min).mul_(iscale)).clamp_(0, nmax)
        wl = weights * Laux
        sum_l = _running_sum(wl)
        sum_l2 = _running_sum(wl * Laux)
        sum_xl = _running_sum(wl.mul_(x))
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_D = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2),
                                 this_scale)
        diff = torch.mul(Laux, this_scale).add_(this_min).sub_(x)
        cur_error = _running_sum(diff.mul_(diff).mul_(weights))
        better = ok & (cur_error < best_error)
        code_iscale = torch.where(better, iscale, code_iscale)
        code_min = torch.where(better, best_min, code_min)  # the shift these codes were made with
        best_error = torch.where(better, cur_error, best_error)
        best_scale = torch.where(better, this_scale, best_scale)
        best_min = torch.where(better, this_min, best_min)
    L = _nearest_int(torch.sub(x, code_min).mul_(code_iscale)).clamp_(0, nmax)
    L = torch.where(flat, torch.zeros_like(L), L)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, mn, best_min)
    return L, best_scale, -best_min


def _make_qx(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on sub-blocks given element-major, x [n, N]: codes
    L [n, N] (float32, 0..2*nmax-1) and the scale [N]. The fit's weights are ``qw`` [n, N] when given (the
    imatrix paths), else x^2."""
    ax = x.abs()
    amax = ax.amax(dim=0)
    first = (ax == amax).to(torch.uint8).argmax(dim=0, keepdim=True)  # the first largest |x|
    signed_max = torch.gather(x, 0, first).squeeze(0)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    w = x * x if qw is None else qw
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum w*x*l and sum w*l*l for the codes l of this candidate scale."""
        levels = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
        return _running_sum(wx * levels), _running_sum((w * levels).mul_(levels))

    code_iscale = _over(float(-nmax), safe_max)
    sumlx, suml2 = fit(code_iscale)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 == 0, torch.ones_like(suml2), suml2),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        candidate = torch.tensor(float(nmax), dtype=torch.float32) + torch.tensor(0.1, dtype=torch.float32) * step
        iscale = -candidate / safe_max
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        code_iscale = torch.where(better, iscale, code_iscale)  # codes rebuilt at the end
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, scale * sumlx, best)
    L = _nearest_int(code_iscale * x).clamp_(-nmax, nmax - 1).add_(nmax)
    L = torch.where(zero, torch.zeros_like(L), L)
    return L, torch.where(zero, torch.zeros_like(scale), scale)


def _make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights=w)`` on groups given element-major: x, w [n, N] float32
    (column k is group k; for the K-quants, the 8 sub-block scales or minimums of a super-block, weighted by
    the sub-blocks' summed weights).

    Returns the scale [N] float32 and L [n, N] int32 holding the C's ``uint8_t`` codes (0..nmax, or a
    negative code's low byte). A search over 9 scales around nmax / max, then up to 5 sweeps that move
    one code at a time while the weighted fit improves, all in the reference's order (the sweeps are
    sequential in the element, vectorised over groups; a group with no change in a sweep stays unchanged
    in the next ones, so running all 5 equals the reference's early exit)."""
    f32 = torch.float32
    mx = torch.zeros_like(x[0])
    for row in x:  # max = MAX(max, x[i]), from 0
        mx = torch.where(mx > row, mx, row)
    zero = mx < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _over(float(nmax), safe_max)
    L0 = _nearest_int_exact(iscale * x).bitwise_and_(0xFF).float()  # stored unclamped in uint8_t
    scale = _over(1.0, iscale)
    diff = x - scale * L0
    best_mse = _running_sum((w * diff).mul_(diff))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        numerator = torch.tensor(0.1, dtype=f32) * float(step) + float(nmax)
        iscale_is = numerator / safe_max
        scale_is = _over(1.0, iscale_is)
        levels = _nearest_int_exact(iscale_is * x).clamp_(max=nmax).float()
        diff = x - scale_is * levels
        mse = _running_sum((w * diff).mul_(diff))
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_is, iscale)
    levels = _nearest_int_exact(iscale * x).clamp_(max=nmax)  # int, may be negative
    wx = w * x
    sumlx = _running_sum(wx * levels.float())
    suml2 = _running_sum((w * levels.float()).mul_(levels.float()))
    L = levels.bitwise_and(0xFF)  # uint8_t L[i] = l
    for _ in range(5):
        for i in range(x.shape[0]):
            Li = L[i].float()
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - (w[i] * Li) * Li
            ok = (slx > 0) & (sl2 > 0)
            safe_slx = torch.where(ok, slx, torch.ones_like(slx))
            new_l = _nearest_int_exact(x[i] * sl2 / safe_slx).clamp_(max=nmax)
            new_f = new_l.float()
            slx = slx + wx[i] * new_f
            sl2 = sl2 + (w[i] * new_f) * new_f
            accept = ok & (new_l != L[i]) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[i] = torch.where(accept, new_l.bitwise_and(0xFF), L[i])
            sumlx = torch.where(accept, slx, sumlx)
            suml2 = torch.where(accept, sl2, suml2)
    positive = suml2 > 0
    scale = torch.where(positive, sumlx / torch.where(positive, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    L = torch.where(zero, torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def _to_uint8_wrapping(v: torch.Tensor) -> torch.Tensor:
    """C's ``(uint8_t) int``: the low byte (negative values wrap)."""
    return v.to(torch.int32).bitwise_and(0xFF).to(torch.uint8)


def _pack_scale_min(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q4_K/Q5_K from 6-bit scales ls and mins lm, uint8 [n, 8] each."""
    out = torch.empty((ls.shape[0], 12), dtype=torch.uint8, device=ls.device)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7: uint8 [n, 8] scales and mins from the 12 bytes [n, 12]."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """[n, 256] codes -> [n, 128]: in each 64-element chunk, byte l = L[l] | L[l + 32] << 4."""
    q = L.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, 256)


def _pack_high_bits(L: torch.Tensor) -> torch.Tensor:
    """Q5_K's 32 bytes of fifth bits: bit 2c (2c+1) of byte j is bit 4 of L[64c + j] (L[64c + 32 + j])."""
    high = (L >> 4).reshape(-1, 8, 32)  # [n, 2c + half, j]
    shifts = torch.arange(8, dtype=torch.uint8, device=L.device).reshape(1, 8, 1)
    return (high << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).reshape(1, 8, 1)
    return ((qh.unsqueeze(1) >> shifts) & 1).reshape(-1, 256)


def _pack_q6(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K's ql [n, 128] and qh [n, 64] from codes [n, 256] in 0..63."""
    q = L.reshape(-1, 2, 4, 32)  # [n, 128-chunk, quarter, l]
    low = q & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _unpack_q6(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    lo = ql.reshape(-1, 2, 2, 32)  # [n, chunk, byte-half, l]
    hi = qh.reshape(-1, 2, 1, 32)
    quarters = [(lo[:, :, 0] & 0xF), (lo[:, :, 1] & 0xF), (lo[:, :, 0] >> 4), (lo[:, :, 1] >> 4)]
    out = [quarters[k] | (((hi[:, :, 0] >> (2 * k)) & 3) << 4) for k in range(4)]
    return torch.stack(out, dim=2).reshape(-1, 256)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


# --- the three types -----------------------------------------------------------------------------------


def _q45_k(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Q4_K (nmax 15) or Q5_K (nmax 31) bytes for super-blocks x [n, 256] float32."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32).t().contiguous()  # element-major [32, n * 8]
    sum_x2 = _running_sum(sub * sub)
    # float32 torch.sqrt is not correctly rounded on every CPU path (about 0.6% of values differ by an ulp
    # here); the square root in float64, rounded once to float32, is (53 >= 2 * 24 + 2 bits) and equals sqrtf
    av_x = torch.sqrt((sum_x2 / 32.0).double()).float()
    weights = sub.abs().add_(av_x)
    if nmax == 15:
        L, scales, mins = _make_qkx2(sub, weights, 15, -1.0, 0.1, 20)
    else:
        L, scales, mins = _make_qkx2(sub, weights, 31, -0.5, 0.1, 15)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.t().reshape(n, 8, 32)
    zero = torch.zeros((), dtype=torch.float32)
    max_scale = torch.maximum(scales.amax(dim=1), zero)  # running max from 0
    max_min = torch.maximum(mins.amax(dim=1), zero)
    inv_scale = torch.where(max_scale > 0, _over(63.0, torch.where(max_scale > 0, max_scale, 1.0)), zero)
    inv_min = torch.where(max_min > 0, _over(63.0, torch.where(max_min > 0, max_min, 1.0)), zero)
    ls = torch.clamp(_to_uint8_wrapping(_nearest_int(inv_scale.unsqueeze(1) * scales)), max=63)
    lm = torch.clamp(_to_uint8_wrapping(_nearest_int(inv_min.unsqueeze(1) * mins)), max=63)
    d16 = (max_scale / 63.0).to(torch.float16)
    dmin16 = (max_min / 63.0).to(torch.float16)
    d = d16.float().unsqueeze(1) * ls.float()  # [n, 8]
    dm = dmin16.float().unsqueeze(1) * lm.float()
    live = d != 0  # where d == 0 the codes of make_qkx2_quants stay
    safe_d = torch.where(live, d, torch.ones_like(d))
    requant = _nearest_int((x.reshape(n, 8, 32) + dm.unsqueeze(2)) / safe_d.unsqueeze(2)).clamp_(0, nmax)
    codes = torch.where(live.unsqueeze(2), requant, L).reshape(n, 256).to(torch.uint8)
    parts = [_fp16_bytes(d16), _fp16_bytes(dmin16), _pack_scale_min(ls, lm)]
    if nmax == 31:
        parts.append(_pack_high_bits(codes))
        codes = codes & 0xF
    parts.append(_pack_nibbles(codes))
    return torch.cat(parts, dim=1)


def _q45_k_search(x: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """First half of ``quantize_row_q4_K_impl`` (nmax 15) / ``quantize_row_q5_K_impl`` (nmax 31) with
    ``quant_weights``, for super-blocks x [n, 256] float32 whose importance is qw [n, 256] (the columns each
    element sits in): per super-block sigma2 = 2 * sum(x^2) / 256; per sub-block of 32 the weights
    qw * sqrt(sigma2 + x^2) drive ``make_qkx3_quants`` (37 candidate scales, rmin -0.9, rdelta 0.05).

    Returns codes uint8 [n, 256], the sub-block scales, minimums and summed weights, float32 [n, 8] each."""
    n = x.shape[0]
    xe = x.t().contiguous()  # [256, n]
    sigma2 = _running_sum(xe * xe).mul_(2.0).div_(float(QK_K))  # 2*sum_x2/QK_K
    sub = x.reshape(n * 8, 32).t().contiguous()  # element-major [32, n * 8]
    q_sub = qw.reshape(n * 8, 32).t()
    root = torch.sqrt((sub * sub).add_(sigma2.repeat_interleave(8)).double()).float()  # sqrtf(sigma2 + x*x)
    weights = (q_sub * root).contiguous()
    sw = _running_sum(weights)
    L, scales, mins = _make_qkx2(sub, weights, nmax, -0.9, 0.05, 36)
    return L.t().reshape(n, 256).to(torch.uint8), scales.reshape(n, 8), mins.reshape(n, 8), sw.reshape(n, 8)


def _q45_k_super_scales(scales: torch.Tensor, mins: torch.Tensor, sw: torch.Tensor,
                        nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The middle of ``quantize_row_q4_K_impl`` / ``_q5_K_impl``: the 8 sub-block scales and minimums [n, 8] of
    each super-block quantized to 6 bits by ``make_qp_quants`` weighted by the sub-blocks' summed weights sw
    (a search and a refit, not the reference path's max / 63). Q4_K stores the 6-bit codes unclamped (a
    negative code's low byte), Q5_K clamps them to 63, both as the C does.

    Returns fp16 d [n], fp16 dmin [n] and the 12 packed scale bytes uint8 [n, 12]. Cheap per element but a
    long sequence of small steps: run it on many super-blocks at once."""
    sw_t = sw.t().contiguous()
    d_block, Ls = _make_qp(scales.t().contiguous(), sw_t, 63)
    m_block, Lm = _make_qp(mins.t().contiguous(), sw_t, 63)
    ls, lm = Ls.t().to(torch.uint8), Lm.t().to(torch.uint8)  # [n, 8]
    if nmax == 31:
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    return d_block.to(torch.float16), m_block.to(torch.float16), _pack_scale_min(ls, lm)


def _q45_k_pack(x: torch.Tensor, L: torch.Tensor, d16: torch.Tensor, dmin16: torch.Tensor,
                scale_bytes: torch.Tensor, nmax: int) -> torch.Tensor:
    """The end of ``quantize_row_q4_K_impl`` / ``_q5_K_impl``: codes recomputed from the stored d, dmin and 6-bit
    scales (as get_scale_min_k4 reads them back) where the sub-block's d is not 0, else the search's codes L
    [n, 256]; then the block bytes [n, 144 or 176]."""
    n = x.shape[0]
    sc, m = _unpack_scale_min(scale_bytes)
    d = d16.float().unsqueeze(1) * sc.float()  # [n, 8]
    dm = dmin16.float().unsqueeze(1) * m.float()
    live = d != 0
    safe_d = torch.where(live, d, torch.ones_like(d))
    requant = _nearest_int_exact((x.reshape(n, 8, 32) + dm.unsqueeze(2)) / safe_d.unsqueeze(2)).clamp_(0, nmax)
    codes = torch.where(live.unsqueeze(2), requant.to(torch.uint8), L.reshape(n, 8, 32)).reshape(n, 256)
    parts = [_fp16_bytes(d16), _fp16_bytes(dmin16), scale_bytes]
    if nmax == 31:
        parts.append(_pack_high_bits(codes))
        codes = codes & 0xF
    parts.append(_pack_nibbles(codes))
    return torch.cat(parts, dim=1)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """Q6_K bytes for super-blocks x [n, 256] float32: ``quantize_row_q6_K_ref``, or with importance qw [n, 256]
    ``quantize_row_q6_K_impl``, whose only difference is that each sub-block's ``make_qx_quants`` fit is
    weighted by qw itself (no sigma2 term: the C has it commented out) instead of x^2."""
    n = x.shape[0]
    q_sub = None if qw is None else qw.reshape(n * 16, 16).t().contiguous()
    L, scales = _make_qx(x.reshape(n * 16, 16).t().contiguous(), 32, q_sub)
    L, scales = L.t().reshape(n, 16, 16), scales.reshape(n, 16)
    abs_scales = scales.abs()
    first = (abs_scales == abs_scales.amax(dim=1, keepdim=True)).to(torch.uint8).argmax(dim=1, keepdim=True)
    max_scale = torch.gather(scales, 1, first).squeeze(1)
    max_abs_scale = abs_scales.amax(dim=1)
    empty = max_abs_scale < GROUP_MAX_EPS  # the whole super-block is stored as zeros
    safe_max = torch.where(empty, torch.ones_like(max_scale), max_scale)
    iscale = _over(-128.0, safe_max)
    d16 = _over(1.0, iscale).to(torch.float16)
    sc = torch.clamp(_nearest_int(iscale.unsqueeze(1) * scales), max=127)  # -128..127
    d = d16.float().unsqueeze(1) * sc
    live = d != 0
    safe_d = torch.where(live, d, torch.ones_like(d))
    ratio = x.reshape(n, 16, 16) / safe_d.unsqueeze(2)
    rounded = _nearest_int(ratio) if qw is None else _nearest_int_exact(ratio).float()
    requant = rounded.clamp_(-32, 31) + 32
    codes = torch.where(live.unsqueeze(2), requant, L).reshape(n, 256).to(torch.uint8)
    ql, qh = _pack_q6(codes)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d16)], dim=1)
    out[empty] = 0
    return out


_KERNELS = {"q4_k": lambda x: _q45_k(x, 15), "q5_k": lambda x: _q45_k(x, 31), "q6_k": _q6_k}


def check_importance(importance: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``importance`` as the float32 vector [W.shape[-1]] (one weight per column) the quantizers use; raises
    ValueError when its shape does not match W's rows or a value is negative or not finite."""
    if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
        raise ValueError("importance must be a floating-point tensor with one value per column")
    if importance.dim() != 1 or W.dim() == 0 or importance.shape[0] != W.shape[-1]:
        raise ValueError(f"importance must have shape [{W.shape[-1] if W.dim() else '?'}] (one value per column "
                         f"of W {tuple(W.shape)}), got {tuple(importance.shape)}")
    imp = importance.detach().to(device=W.device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance values must be finite and non-negative")
    return imp


def block_importance(importance: torch.Tensor, block: int, start: int, stop: int) -> torch.Tensor:
    """The importance of flat blocks [start, stop) of a row-major tensor whose rows are ``importance.numel()``
    long, cut into blocks of ``block``: float32 [stop - start, block] (block k covers the columns of block
    k mod blocks-per-row)."""
    per_row = importance.reshape(-1, block)
    index = torch.arange(start, stop, device=importance.device) % per_row.shape[0]
    return per_row[index]


def quantize_kquant(W: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> KQuantTensor:
    """Quantize W (float16/bfloat16/float32; last dimension a multiple of 256) to ``qtype`` (q4_k, q5_k or q6_k).

    Without ``importance``: bytes identical to llama.cpp's ``quantize_row_<type>_ref`` on ``W.float()`` (what
    llama-quantize runs without an importance matrix). With ``importance`` (float32 [W.shape[-1]], one
    non-negative weight per column: llama.cpp's ``quant_weights`` / imatrix entry): bytes identical to
    ``ggml_quantize_chunk(type, W, ..., imatrix=importance)``, i.e. ``quantize_row_<type>_impl`` row by row.
    Raises ValueError when the rows are not whole super-blocks or the importance does not fit.

    Time per 4096x4096 float32 matrix with importance, one torch thread on a busy 2-core machine, measured
    once (indicative; llama.cpp's ``ggml_quantize_chunk`` on the same core in brackets): Q4_K 3.1 s (2.3 s),
    Q5_K 2.9 s (2.2 s), Q6_K 1.0 s (0.5 s).
    """
    if qtype not in K_TYPES:
        raise ValueError(f"K-quant type must be one of {', '.join(K_TYPES)}, got {qtype!r}")
    check_float_matrix(W)
    if W.dim() == 0 or W.shape[-1] % QK_K:
        raise ValueError(f"{qtype.upper()} needs rows (the last dimension) that are a multiple of {QK_K}, "
                         f"got shape {tuple(W.shape)}")
    imp = None if importance is None else check_importance(importance, W)
    flat = W.reshape(-1, QK_K)
    n = flat.shape[0]
    blocks = torch.empty((n, TYPE_SIZES[qtype]), dtype=torch.uint8, device=W.device)
    steps = [(start, min(start + CHUNK_SUPERBLOCKS, n)) for start in range(0, n, CHUNK_SUPERBLOCKS)]
    if imp is None:
        for start, stop in steps:
            blocks[start:stop] = _KERNELS[qtype](flat[start:stop].float())
    elif qtype == "q6_k":
        for start, stop in steps:
            blocks[start:stop] = _q6_k(flat[start:stop].float(), block_importance(imp, QK_K, start, stop))
    else:  # three passes, so that make_qp_quants' short sequential sweeps run once over all super-blocks
        nmax = 15 if qtype == "q4_k" else 31
        codes = torch.empty((n, QK_K), dtype=torch.uint8, device=W.device)
        scales, mins, sw = (torch.empty((n, 8), dtype=torch.float32, device=W.device) for _ in range(3))
        for start, stop in steps:
            codes[start:stop], scales[start:stop], mins[start:stop], sw[start:stop] = _q45_k_search(
                flat[start:stop].float(), block_importance(imp, QK_K, start, stop), nmax)
        d16, dmin16, scale_bytes = _q45_k_super_scales(scales, mins, sw, nmax)
        for start, stop in steps:
            blocks[start:stop] = _q45_k_pack(flat[start:stop].float(), codes[start:stop], d16[start:stop],
                                             dmin16[start:stop], scale_bytes[start:stop], nmax)
    return KQuantTensor(shape=tuple(W.shape), dtype=W.dtype, blocks=blocks, qtype=qtype)
