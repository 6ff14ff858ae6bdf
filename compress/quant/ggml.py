"""llama.cpp's 32-element block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, bit-identical to ``gguf.quants.quantize``.

Reference: ``quantize_row_q4_0_ref`` ... ``quantize_row_q8_0_ref`` in llama.cpp's
``ggml/src/ggml-quants.c``, and their numpy ports in the ``gguf`` package (``gguf/quants.py``),
which these functions reproduce byte for byte. The 256-element K-quants are in
:mod:`compress.quant.kquants`; :func:`quantize_ggml` dispatches to them.

Every row (the last dimension, innermost in GGUF) is cut into blocks of 32 consecutive elements;
the row length must be a multiple of 32 (ggml blocks never straddle rows). Per block, all in
float32 with the same operation order as the references:

    Q4_0: amax = the element of largest magnitude (the first one on ties), signed
          d = amax / -8,  id = 1/d (0 if d == 0)
          q = min(15, trunc(x * id + 8.5))                   -> x' = (q - 8) * fp16(d)
    Q4_1: mn, mx = min, max;  d = (mx - mn) / 15,  id = 1/d (0 if d == 0)
          q = min(15, trunc((x - mn) * id + 0.5))            -> x' = q * fp16(d) + fp16(mn)
    Q5_0: as Q4_0 with d = amax / -16, q = min(31, trunc(x * id + 16.5))  -> x' = (q - 16) * fp16(d)
    Q5_1: as Q4_1 with d = (mx - mn) / 31, q in 0..31
    Q8_0: d = max|x| / 127,  id = 1/d (0 if d == 0)
          q = roundf(x * id)  (half away from zero)          -> x' = q * fp16(d)

Codes are computed with the float32 ``d``; only the stored ``d`` (and ``m``) is rounded to float16,
as llama.cpp does. float16/bfloat16 inputs are widened to float32 first (exact), as llama.cpp's
converter does before quantizing.

Block bytes (:meth:`GGMLTensor.packed`), little-endian, blocks in row-major order:

    Q4_0 (18 bytes): fp16 d, 16 bytes: low nibble of byte j = q[j], high nibble = q[j + 16]
    Q4_1 (20 bytes): fp16 d, fp16 m, 16 nibble bytes as Q4_0
    Q5_0 (22 bytes): fp16 d, 4 bytes qh (bit j = bit 4 of q[j], little-endian), 16 nibble bytes as Q4_0
    Q5_1 (24 bytes): fp16 d, fp16 m, qh, 16 nibble bytes
    Q8_0 (34 bytes): fp16 d, 32 int8 q

Speed: about 10 element-wise passes per block (min/max instead of numpy's abs + argmax, the argmax
only for blocks where +a and -a tie, non-finite fix-ups only when a block needs them). On one CPU
thread a 4096x4096 float32 matrix takes 1.5-3x less time than ``gguf.quants.quantize``. Each pass
is one torch parallel region; on a machine whose cores are busy with other work, torch's threads
wait for each other at every pass and a single thread is several times faster (see
reports/bench_quantize.md's contention probe).

With an importance matrix (``quantize_ggml(W, config, importance)``, one weight per column), the types
follow llama.cpp's ``quantize_row_<type>_impl`` instead, as ``ggml_quantize_chunk`` does when given an
imatrix: per row sigma2 = mean(x^2), per element the weight ``importance * sqrt(sigma2 + x^2)``, and per
block a weighted least-squares search -- ``make_qx_quants`` over 19 scales around -8/max (-16/max) for
Q4_0 (Q5_0), ``make_qkx3_quants`` over 37 (scale, minimum) candidates for Q4_1/Q5_1 -- vectorised over
blocks with the reference's running sums kept in order (see :mod:`compress.quant.kquants`). Q8_0 has no
such path: llama.cpp ignores the importance for it. All-zero blocks come out as d = 0 and codes 0.

Non-finite inputs: where ``x * id`` is not finite (only possible with inf/NaN weights or block
scales below ~1e-37, whose reciprocal overflows), the code is 0, which is what the references give
on x86-64 (a C float->int conversion of inf/NaN yields 0x80000000, whose low byte is 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.ggml_types import (
    BLOCK_TYPES,
    GGML_TYPE_IDS,
    GGML_TYPES,
    K_MIXTURES,
    K_TYPES,
    LEGACY_TYPES,
    TYPE_SIZES,
    ggml_block_size,
    ggml_nbytes,
)
from compress.quant.base import QuantizedTensor, check_float_matrix
from compress.quant.kquants import (
    KQuantTensor,
    _make_qkx2,
    _make_qx,
    _running_sum,
    block_importance,
    check_importance,
    quantize_kquant,
)

BLOCK = BLOCK_TYPES["q4_0"].block_size  # QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = 32
CHUNK_BLOCKS = 1 << 15  # 32768 blocks (4 MB of float32) per step: intermediates stay in cache


@dataclass(frozen=True)
class GGMLConfig:
    """A llama.cpp quantization: a block type ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"q8_0"`` (blocks
    of 32) or ``"q4_k"``, ``"q5_k"``, ``"q6_k"`` (super-blocks of 256), or a K-quant file type (``"q4_k_m"``...,
    see ``K_MIXTURES``), whose tensors take its base type unless the file's recipe says otherwise."""

    qtype: str = "q4_0"

    def __post_init__(self) -> None:
        if self.qtype not in GGML_TYPES and self.qtype not in K_MIXTURES:
            raise ValueError(f"ggml type must be one of {', '.join((*GGML_TYPES, *K_MIXTURES))}, got {self.qtype!r}")

    @property
    def tensor_type(self) -> str:
        """The block type one tensor is quantized to (a file type's base type)."""
        return K_MIXTURES.get(self.qtype, self.qtype)

    @property
    def block_size(self) -> int:
        return ggml_block_size(self.tensor_type)


@dataclass
class GGMLTensor(QuantizedTensor):
    """A tensor quantized to a llama.cpp block type. With ``n_blocks = numel // 32`` (row-major):

    codes: uint8 [*shape] in 0..15 (Q4_0, Q4_1), 0..31 (Q5_0, Q5_1) or int8 [*shape] in -127..127 (Q8_0),
    one per element; d: float16 [n_blocks] block scales; m: float16 [n_blocks] block minimums (Q4_1, Q5_1).
    """

    codes: torch.Tensor
    d: torch.Tensor
    qtype: str
    m: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return self.numel // BLOCK

    @property
    def ggml_type_id(self) -> int:
        return GGML_TYPE_IDS[self.qtype]

    @property
    def chunk_unit(self) -> int:
        return BLOCK

    def dequantize_range(self, start: int, stop: int) -> torch.Tensor:
        """x' in float32 exactly as ``gguf.quants.dequantize`` computes it."""
        b0, b1 = start // BLOCK, stop // BLOCK
        d = self.d[b0:b1].float().unsqueeze(1)
        q = self.codes.reshape(-1, BLOCK)[b0:b1]
        if self.qtype in ("q4_0", "q5_0"):
            out = d * (q.to(torch.int16) - (8 if self.qtype == "q4_0" else 16)).float()
        elif self.qtype in ("q4_1", "q5_1"):
            assert self.m is not None
            out = d * q.float() + self.m[b0:b1].float().unsqueeze(1)
        else:
            out = q.float() * d
        return out.reshape(-1)

    def storage_bits(self) -> int:
        return 8 * TYPE_SIZES[self.qtype] * self.n_blocks

    def packed(self) -> torch.Tensor:
        """The GGUF bytes: uint8 ``[*shape[:-1], shape[-1] // 32 * type_size]`` (see module docstring)."""
        n, size = self.n_blocks, TYPE_SIZES[self.qtype]
        out = torch.empty((n, size), dtype=torch.uint8, device=self.codes.device)
        out[:, 0:2] = self.d.contiguous().view(torch.uint8).reshape(n, 2)
        if self.qtype == "q8_0":
            out[:, 2:] = self.codes.reshape(n, BLOCK).view(torch.uint8)
        else:
            start = 2
            if self.m is not None:
                out[:, 2:4] = self.m.contiguous().view(torch.uint8).reshape(n, 2)
                start = 4
            q = self.codes.reshape(n, 2, BLOCK // 2)
            if self.qtype in ("q5_0", "q5_1"):  # bit 4 of every code, little-endian, then the low nibbles
                high = q.reshape(n, 4, 8).bitwise_right_shift(4)
                weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=q.device)
                out[:, start:start + 4] = (high * weights).sum(-1, dtype=torch.uint8)
                start += 4
                q = q & 0x0F
            torch.bitwise_left_shift(q[:, 1], 4, out=out[:, start:]).bitwise_or_(q[:, 0])
        return out.reshape(*self.shape[:-1], self.shape[-1] // BLOCK * size)

    def scales_finite(self) -> bool:
        """Whether every stored scale (and minimum) is finite: false for NaN/inf weights, or for blocks
        whose scale overflows float16 (|x| above ~65504 * 8 for Q4_0, 65504 * 127 for Q8_0)."""
        ok = bool(torch.isfinite(self.d).all())
        return ok and (self.m is None or bool(torch.isfinite(self.m).all()))

    def to_bytes(self) -> bytes:
        """:meth:`packed` as ``bytes``: exactly what a GGUF file stores for this tensor."""
        return self.packed().cpu().numpy().tobytes()


def _check(W: torch.Tensor, qtype: str) -> None:
    check_float_matrix(W)
    if W.dim() == 0 or W.shape[-1] % BLOCK:
        raise ValueError(f"{qtype.upper()} needs rows (the last dimension) that are a multiple of {BLOCK}, "
                         f"got shape {tuple(W.shape)}")


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``0 if d == 0 else 1 / d`` in float32 (an IEEE division, as numpy and C compute it)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.div(torch.ones_like(d), d))


def _all_finite(*block_values: torch.Tensor) -> bool:
    """Whether every per-block value is finite: then every element-wise intermediate is finite too."""
    return all(bool(torch.isfinite(t).all()) for t in block_values)


def _zero_non_finite(v: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _signed_absmax(x: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Per block, the element of largest magnitude with its sign; the first one on ties (numpy's argmax)."""
    out = torch.where(mx > -mn, mx, mn)
    tie = (mx == -mn).nonzero().squeeze(1)  # +a and -a (or +0 and -0) both present: order decides
    if tie.numel():
        xs = x[tie]
        out[tie] = torch.gather(xs, 1, xs.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return out


def _symmetric(x: torch.Tensor, codes: torch.Tensor, half: int) -> tuple[torch.Tensor, None]:
    """Q4_0 (half = 8) and Q5_0 (half = 16): fill ``codes`` [nb, 32] uint8 for blocks x [nb, 32] float32;
    return the float32 scales."""
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    d = _signed_absmax(x, mx, mn) / float(-half)
    inv = _reciprocal(d)
    v = torch.mul(x, inv.unsqueeze(1)).add_(half + 0.5)  # two roundings, as the reference (no FMA)
    if not _all_finite(d, inv):
        v = _zero_non_finite(v)
    codes.copy_(v.clamp_(0.0, 2.0 * half - 1))  # float -> uint8 truncates: min(2*half - 1, trunc(v))
    return d, None


def _affine(x: torch.Tensor, codes: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 (levels = 15) and Q5_1 (levels = 31): codes, scales and minimums."""
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    d = (mx - mn) / float(levels)
    inv = _reciprocal(d)
    v = torch.sub(x, mn.unsqueeze(1)).mul_(inv.unsqueeze(1)).add_(0.5)
    if not _all_finite(d, inv, mn):
        v = _zero_non_finite(v)
    codes.copy_(v.clamp_(0.0, float(levels)))
    return d, mn


_ALMOST_HALF = 0.49999997  # float32 nextafter(0.5, 0)


def _q8_0(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, None]:
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    d = torch.maximum(mx, -mn).abs_() / 127.0  # max |x| (abs_ turns a -0.0 into +0.0, as abs does)
    inv = _reciprocal(d)
    v = torch.mul(x, inv.unsqueeze(1))
    # roundf (half away from zero) = trunc(v + sign(v) * nextafter(0.5, 0)) for |v| < 2^22: the sum
    # is exact or rounds the right way at every .5 and just below it (tested against np_roundf).
    v.add_(torch.sign(v).mul_(_ALMOST_HALF))
    if not _all_finite(d, inv):
        v = _zero_non_finite(v)
    codes.copy_(v)  # float -> int8 truncates toward zero; |v| <= 127.5
    return d, None


_KERNELS = {"q4_0": lambda x, c: _symmetric(x, c, 8), "q4_1": lambda x, c: _affine(x, c, 15),
            "q5_0": lambda x, c: _symmetric(x, c, 16), "q5_1": lambda x, c: _affine(x, c, 31), "q8_0": _q8_0}

# --- with an importance matrix (llama.cpp's quantize_row_<type>_impl with quant_weights) ---------------------

ROW_SUM_ELEMENTS = 1 << 22  # rows whose squares are summed per step (16 MiB of float32, transposed)


def _row_sigma2(rows: torch.Tensor) -> torch.Tensor:
    """``sigma2 = sum_x2 / n_per_row`` per row of rows [R, n_per_row]: the squares summed in float32 in column
    order (the C's running sum), vectorised over rows. Returns float32 [R]."""
    n_rows, n_per_row = rows.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    step = max(1, ROW_SUM_ELEMENTS // n_per_row)
    for start in range(0, n_rows, step):
        t = rows[start:start + step].float().t().contiguous()  # column-major: one running-sum step per column
        out[start:start + step] = _running_sum(t * t)
    return out / torch.full_like(out, float(n_per_row))


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks x [nb, 32], their importance qw [nb, 32] and their row's sigma2 [nb] -> x and the fit's weights
    ``qw * sqrtf(sigma2 + x*x)``, both element-major [32, nb] (sqrtf: in float64, rounded once)."""
    xe = x.t().contiguous()
    root = torch.sqrt((xe * xe).add_(sigma2).double()).float()
    return xe, (qw.t() * root).contiguous()


def _symmetric_imatrix(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, codes: torch.Tensor,
                       half: int) -> tuple[torch.Tensor, None]:
    """Q4_0 (half 8) / Q5_0 (half 16) with importance: ``make_qx_quants(32, half, x, L, 1, weights)``, a search
    over 19 scales around -half / max by weighted least squares. An all-zero block (max |x| < 1e-15) gets
    d = 0 and codes 0 (not ``half``, unlike the reference path)."""
    xe, we = _imatrix_weights(x, qw, sigma2)
    L, scale = _make_qx(xe, half, we)
    codes.copy_(L.t())
    return scale, None


def _affine_imatrix(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, codes: torch.Tensor,
                    levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 (levels 15) / Q5_1 (levels 31) with importance: ``make_qkx3_quants(32, levels, x, weights, L, &min,
    Laux, -0.9, 0.05, 36)``; d = the scale, m = -the_min (the fitted minimum, <= 0, with the C's sign of zero)."""
    xe, we = _imatrix_weights(x, qw, sigma2)
    L, scale, the_min = _make_qkx2(xe, we, levels, -0.9, 0.05, 36)
    codes.copy_(L.t())
    return scale, -the_min


_IMATRIX_KERNELS = {
    "q4_0": lambda x, qw, s, c: _symmetric_imatrix(x, qw, s, c, 8),
    "q4_1": lambda x, qw, s, c: _affine_imatrix(x, qw, s, c, 15),
    "q5_0": lambda x, qw, s, c: _symmetric_imatrix(x, qw, s, c, 16),
    "q5_1": lambda x, qw, s, c: _affine_imatrix(x, qw, s, c, 31),
}
IMATRIX_CHUNK_BLOCKS = 1 << 13  # 8192 blocks per step with importance: the 37-candidate search's temporaries


def quantize_ggml(W: torch.Tensor, config: GGMLConfig = GGMLConfig(),
                  importance: torch.Tensor | None = None) -> GGMLTensor | KQuantTensor:
    """Quantize W (float16/bfloat16/float32, last dimension a multiple of the block) to a llama.cpp type.

    Without ``importance``: bytes identical to ``gguf.quants.quantize(W.float().numpy(),
    GGMLQuantizationType.<TYPE>)`` for the 32-element types, and to llama.cpp's ``quantize_row_<type>_ref``
    for the K-quants (what llama-quantize writes without an importance matrix).

    ``importance``: float32 [W.shape[-1]], one non-negative weight per column (an entry of a llama.cpp
    importance matrix, :meth:`compress.formats.imatrix.ImportanceMatrix.importance`). With it the bytes are
    those of ``ggml_quantize_chunk(type, W, ..., imatrix=importance)``: ``quantize_row_<type>_impl`` row by
    row, which fits each block's scale (and minimum) by least squares weighted with
    ``importance * sqrt(sigma2 + x^2)`` (sigma2 = mean x^2 of the row; of the super-block, doubled, for Q4_K
    and Q5_K; Q6_K weights by the importance alone). Q8_0 ignores it, as llama.cpp does
    (``quantize_q8_0`` never reads ``quant_weights``): the bytes are those without.

    Time per 4096x4096 float32 matrix with importance, one torch thread on a busy 2-core machine, measured
    once (indicative), with llama.cpp's ``ggml_quantize_chunk`` on the same core in brackets: Q4_0 1.3 s
    (0.5 s), Q4_1 3.0 s (1.9 s), Q5_0 1.2 s (0.4 s), Q5_1 3.0 s (1.9 s), Q8_0 0.04 s (0.06 s, importance
    ignored), Q4_K 3.1 s (2.3 s), Q5_K 2.9 s (2.2 s), Q6_K 1.0 s (0.5 s). Without importance the 32-element
    types take about 0.04 s.

    Raises ValueError when the rows are not whole blocks or the importance does not fit W. NaN weights are
    not supported (the result is unspecified, as in llama.cpp).
    """
    qtype = config.tensor_type
    if qtype in K_TYPES:
        return quantize_kquant(W, qtype, importance)
    _check(W, qtype)
    imp = None if importance is None or qtype == "q8_0" else check_importance(importance, W)
    flat = W.reshape(-1, BLOCK)
    n = flat.shape[0]
    codes = torch.empty((n, BLOCK), dtype=torch.int8 if qtype == "q8_0" else torch.uint8, device=W.device)
    d = torch.empty(n, dtype=torch.float16, device=W.device)
    m = torch.empty(n, dtype=torch.float16, device=W.device) if qtype in ("q4_1", "q5_1") else None
    if imp is None:
        kernel = _KERNELS[qtype]
        steps = [(start, min(start + CHUNK_BLOCKS, n)) for start in range(0, n, CHUNK_BLOCKS)]
    else:
        blocks_per_row = W.shape[-1] // BLOCK
        sigma2 = _row_sigma2(W.reshape(-1, W.shape[-1]))
        imatrix_kernel = _IMATRIX_KERNELS[qtype]
        steps = [(start, min(start + IMATRIX_CHUNK_BLOCKS, n)) for start in range(0, n, IMATRIX_CHUNK_BLOCKS)]
    for start, stop in steps:
        x = flat[start:stop].float()
        if imp is None:
            dd, mm = kernel(x, codes[start:stop])
        else:
            row_sigma2 = sigma2[torch.arange(start, stop, device=W.device) // blocks_per_row]
            dd, mm = imatrix_kernel(x, block_importance(imp, BLOCK, start, stop), row_sigma2, codes[start:stop])
        d[start:stop] = dd  # float32 -> float16, round to nearest even (as numpy's astype)
        if m is not None and mm is not None:
            m[start:stop] = mm
    return GGMLTensor(shape=tuple(W.shape), dtype=W.dtype, codes=codes.reshape(W.shape), d=d, qtype=qtype, m=m)


def quantize_q4_0(W: torch.Tensor) -> GGMLTensor:
    """llama.cpp Q4_0 (symmetric 4-bit, one fp16 scale per 32 elements; 4.5 bits per weight)."""
    return quantize_ggml(W, GGMLConfig("q4_0"))


def quantize_q4_1(W: torch.Tensor) -> GGMLTensor:
    """llama.cpp Q4_1 (4-bit with fp16 scale and minimum per 32 elements; 5 bits per weight)."""
    return quantize_ggml(W, GGMLConfig("q4_1"))


def quantize_q8_0(W: torch.Tensor) -> GGMLTensor:
    """llama.cpp Q8_0 (8-bit, one fp16 scale per 32 elements; 8.5 bits per weight)."""
    return quantize_ggml(W, GGMLConfig("q8_0"))


__all__ = [
    "BLOCK",
    "GGML_TYPES",
    "K_MIXTURES",
    "LEGACY_TYPES",
    "GGMLConfig",
    "GGMLTensor",
    "KQuantTensor",
    "ggml_block_size",
    "ggml_nbytes",
    "quantize_ggml",
    "quantize_q4_0",
    "quantize_q4_1",
    "quantize_q8_0",
]
