"""NF4 and FP4 block-wise 4-bit quantization, code-for-code identical to bitsandbytes.

Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023),
https://arxiv.org/abs/2305.14314, and ``bitsandbytes.functional.quantize_4bit``.

Algorithm (the tensor is flattened row-major and cut into blocks of ``block_size`` elements, the
last block possibly partial):

    absmax[b] = max |x| over block b                           (float32)
    s = x * (1 / absmax[b])      (full blocks; the partial last block uses x / absmax)
    code = index of the table value nearest to s, ties to the lower one

The nearest-value search is where bitsandbytes spends most of its time (``torch.bucketize``, a
scalar binary search per element). We get the same answer from vectorised ops: the interval
[-1, 1] is cut into ``2K`` equal cells, with K chosen so that no cell holds more than one decision
boundary (midpoint between adjacent table values) and no boundary lies within rounding distance of
a cell edge. Then ``code = base[cell] + (s > boundary[cell])``, two table look-ups and one
comparison. Work is done a cache-sized chunk at a time. Both choices change speed, not results:
the tests compare every code with bitsandbytes.

Double quantization (``double_quant``, transformers' ``bnb_4bit_use_double_quant``): the float32
absmax values get ``offset = mean(absmax)`` subtracted and are quantized to 8 bits in blocks of
256 against bitsandbytes' signed dynamic map, step for step as bitsandbytes' CPU kernel does it
(see :func:`quantize_blockwise_8bit`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from compress.catalog import BLOCK_SIZES  # re-exported: what bitsandbytes accepts
from compress.quant.base import QuantizedTensor, check_float_matrix

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (bitsandbytes' e2m1 variant): code 0..7 positive, bit 3 is the sign; not sorted. Defined as
# bitsandbytes defines it, as multiples of 1/12 computed in float32.
FP4_TABLE = tuple(
    (torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12).tolist()
)
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}
NESTED_BLOCK_SIZE = 256  # hard-coded by bitsandbytes and transformers' loader
CHUNK_ELEMENTS = 1 << 18  # ~1 MB of float32 per chunk: the intermediates stay in cache


@dataclass(frozen=True)
class NF4Config:
    """Block-wise 4-bit quantization with a fixed 16-value table (bitsandbytes' NF4 or FP4)."""

    block_size: int = 64
    double_quant: bool = False
    quant_type: str = "nf4"

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.quant_type not in TABLES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")


@dataclass
class NF4Tensor(QuantizedTensor):
    """codes: uint8 [n] one 4-bit code per element (row-major order of the original tensor).
    absmax: float32 [ceil(n / block_size)], or with double quant uint8 codes of the same length,
    decoded by ``nested_code[absmax] * nested_absmax[i // 256] + offset``."""

    codes: torch.Tensor
    absmax: torch.Tensor
    block_size: int
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(n_blocks / 256)]
    nested_code: torch.Tensor | None = None  # float32 [256]
    offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_float(self) -> torch.Tensor:
        """The per-block scales as float32 [n_blocks], decoding double quantization if used."""
        if self.nested_absmax is None:
            return self.absmax
        assert self.nested_code is not None and self.offset is not None
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code,
                                         NESTED_BLOCK_SIZE) + self.offset

    @property
    def chunk_unit(self) -> int:
        return self.block_size

    def dequantize_range(self, start: int, stop: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """out[j] = table[code_j] * absmax[j // block_size] in float32, as bitsandbytes computes it."""
        table = torch.tensor(TABLES[self.quant_type], dtype=torch.float32, device=self.codes.device)
        scale = self.absmax_float() if scale is None else scale
        values = table[self.codes[start:stop].long()]
        bs = self.block_size
        full = min(stop, self.numel - self.numel % bs) - start  # whole blocks in this range
        out = torch.empty_like(values)
        if full > 0:
            out[:full] = (values[:full].view(-1, bs) * scale[start // bs: (start + full) // bs].unsqueeze(1)).view(-1)
        if full < values.numel():  # the partial last block
            out[max(full, 0):] = values[max(full, 0):] * scale[-1]
        return out

    def dequantize_chunks(self, max_elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
        scale = self.absmax_float()  # decoded once (double quantization)
        step = max(max_elements // self.block_size, 1) * self.block_size
        for start in range(0, self.numel, step):
            yield self.dequantize_range(start, min(start + step, self.numel), scale)

    def storage_bits(self) -> int:
        n_blocks = self.absmax.numel()
        bits = 4 * self.numel
        if self.nested_absmax is None:
            return bits + 32 * n_blocks
        return bits + 8 * n_blocks + 32 * self.nested_absmax.numel() + 32  # + offset


@functools.cache
def _cell_tables(quant_type: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Look-up tables for the vectorised nearest-value search (see module docstring).

    Returns K, base [2K+2] uint8, boundary [2K+2] float32 and, for FP4, the map from sorted
    position to code (identity for NF4).
    """
    table = torch.tensor(TABLES[quant_type], dtype=torch.float32)
    order = torch.argsort(table)  # the same call bitsandbytes makes (FP4 has +0 and -0)
    sorted_vals = table[order]
    bounds = (sorted_vals[:-1] + sorted_vals[1:]) / 2  # float32, as bitsandbytes computes them
    b64 = bounds.double()
    for log_k in range(3, 12):
        K = 1 << log_k
        # cell = trunc(s * K + K + 1/2): edges at s = (j - K - 1/2) / K, none of them at 0.
        edges = (torch.arange(2 * K + 2, dtype=torch.float64) - K - 0.5) / K
        # Rounding in the cell computation moves s by at most ~2^-22; keep boundaries well away.
        if (b64[:, None] - edges[None, :]).abs().min() < 2.0**-18:
            continue
        cell_of = torch.floor(b64 * K + K + 0.5).long()
        if torch.bincount(cell_of).max() > 1:
            continue
        base = torch.searchsorted(b64, edges, right=False)  # number of boundaries below each cell
        boundary = torch.full((2 * K + 2,), math.inf, dtype=torch.float32)
        boundary[cell_of] = bounds
        return K, base.to(torch.uint8), boundary, order.to(torch.uint8)
    raise AssertionError(f"no cell size separates the {quant_type} boundaries")  # pragma: no cover


@functools.cache
def zero_code(quant_type: str) -> int:
    """The code bitsandbytes gives to 0.0 (it pads an odd element count with it)."""
    return int(_nearest_codes(torch.zeros(1), quant_type)[0])


def _nearest_codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """uint8 codes of the table values nearest to ``scaled`` (float32, any shape), ties down."""
    K, base, boundary, order = _cell_tables(quant_type)
    device = scaled.device
    base, boundary = base.to(device), boundary.to(device)
    offset = torch.tensor(K + 0.5, device=device)
    cell = torch.addcmul(offset, scaled, torch.tensor(float(K), device=device))
    cell = cell.to(torch.int64).clamp_(0, 2 * K + 1).reshape(-1)
    flat = scaled.reshape(-1)
    pos = torch.take(base, cell).add_(torch.take(boundary, cell).lt(flat))
    if quant_type != "nf4":  # FP4's table is not sorted: map sorted position to code
        return order.to(device)[pos.long()]
    return pos


def quantize_nf4(W: torch.Tensor, config: NF4Config = NF4Config()) -> NF4Tensor:
    """Quantize W (any shape; float16/bfloat16/float32) block-wise to NF4 or FP4.

    Identical codes and statistics to ``bitsandbytes.functional.quantize_4bit(W, blocksize,
    quant_type, compress_statistics=double_quant)``.
    """
    check_float_matrix(W)
    flat = W.reshape(-1)
    n = flat.numel()
    bs = config.block_size
    full = n - n % bs
    codes = torch.empty(n, dtype=torch.uint8, device=W.device)
    absmax_parts = []
    # Full blocks, a chunk of whole blocks at a time.
    step = max(CHUNK_ELEMENTS // bs, 1) * bs
    for start in range(0, full, step):
        x = flat[start : min(start + step, full)].float().reshape(-1, bs)
        amax = x.abs().amax(dim=1)
        scaled = x * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1)
        codes[start : start + x.numel()] = _nearest_codes(scaled, config.quant_type)
        absmax_parts.append(amax)
    if full < n:  # the partial last block: bitsandbytes divides instead of multiplying
        x = flat[full:].float()
        amax = x.abs().amax().clamp(min=1e-38)
        codes[full:] = _nearest_codes(x / amax, config.quant_type)
        absmax_parts.append(amax.reshape(1))
    absmax = torch.cat(absmax_parts) if absmax_parts else torch.empty(0, device=W.device)
    result = NF4Tensor(shape=tuple(W.shape), dtype=W.dtype, codes=codes, absmax=absmax,
                       block_size=bs, quant_type=config.quant_type)
    if config.double_quant:
        offset = absmax.mean()
        q, nested_absmax, nested_code = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCK_SIZE)
        result.absmax, result.nested_absmax, result.nested_code = q, nested_absmax, nested_code
        result.offset = float(offset)
    return result


@functools.cache
def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), 256 values.

    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (2016),
    https://arxiv.org/abs/1511.04561: a sign, an exponent 10^-k (k = 0..6) and a linear fraction
    whose resolution doubles with each step towards 1. Level i holds 2^i fraction values, the
    midpoints of ``linspace(0.1, 1, 2^i + 1)``, all in float32; plus 0 and 1.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        magnitudes = (10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        parts += [magnitudes, -magnitudes]
    values = torch.cat(parts)
    assert values.numel() == 256
    return values.sort().values


@functools.cache
def _dynamic_map_lut() -> torch.Tensor:
    """uint8 [65536]: the code chosen for each of 65536 evenly spaced points of [-1, 1].

    bitsandbytes' CPU kernel (0.50) does not search the map per element: it rounds the normalised
    value to 16 bits and reads the code from this table (nearest map value to the grid point,
    ties to the lower code). We build the same table so that double-quantized statistics match.
    """
    code = dynamic_map_signed()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization of a small float32 vector against the signed dynamic map.

    Returns (codes uint8 [n], absmax float32 [ceil(n / block_size)], the map float32 [256]).
    Follows bitsandbytes' CPU kernel step by step in float32: v = clamp(x * (1 / absmax), -1, 1),
    index = trunc(((v + 1) * 0.5) * 65535 + 0.5) into :func:`_dynamic_map_lut`; an all-zero
    block gets code 0.
    """
    code = dynamic_map_signed().to(x.device)
    n = x.numel()
    pad = (-n) % block_size
    blocks = torch.nn.functional.pad(x.float(), (0, pad)).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / absmax).unsqueeze(1)).clamp(-1.0, 1.0)
    index = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_map_lut().to(x.device)[index.clamp_(0, 65535)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].contiguous(), absmax, code


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              block_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: float32 [n]."""
    values = code[codes.long()]
    return values * absmax.repeat_interleave(block_size)[: values.numel()]
