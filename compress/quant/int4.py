"""INT4 group-wise round-to-nearest quantization along the input dimension (GPTQ convention).

Reference: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022), https://arxiv.org/abs/2210.17323 -- the RTN parameters below are the ones its
``Quantizer.find_params`` computes, so that any GPTQ loader reads our codes the way we mean them.

For W: [out, in], each row is cut into groups of ``group_size`` consecutive input channels (the last
group may be shorter when ``in`` is not a multiple). Per (row, group):

    asymmetric: lo = min(min(w), 0), hi = max(max(w), 0)      (zero is always representable)
                scale = (hi - lo) / 15, zero = round(-lo / scale)
    symmetric:  a = max(|min(w)|, |max(w)|), scale = 2a / 15, zero = 8
    an all-zero group uses lo = -1, hi = 1 (as GPTQ does), so scale is never 0
    q = clamp(round(w / scale) + zero, 0, 15)              (round half to even, as torch.round)
    w' = scale * (q - zero)

The scale is rounded to ``scale_dtype`` (float16 for GPTQ checkpoints) *before* the codes are
computed, so codes and stored scales agree: w' above is exactly what a loader reconstructs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compress.catalog import GROUP_SIZES  # re-exported: int4 group sizes
from compress.quant.base import QuantizedTensor, check_float_matrix

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK_ELEMENTS = 1 << 18  # rows are processed a cache-sized chunk at a time


@dataclass(frozen=True)
class Int4Config:
    """INT4 group-wise RTN. ``symmetric=False`` (default) keeps a 4-bit zero point per group."""

    group_size: int = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    # Groups may be any set of ``group_size`` input channels, named per channel by a g_idx (GPTQ's act-order:
    # groups follow the order GPTQ rounds the channels in); only the gptq layout can store it.
    desc_act: bool = False

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size {self.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype must be float16, bfloat16 or float32, got {self.scale_dtype}")


@dataclass
class Int4Tensor(QuantizedTensor):
    """codes: uint8 [out, in] in 0..15; scales: float32 [out, n_groups] (values exactly
    representable in ``scale_dtype``); zeros: uint8 [out, n_groups] in 0..15 (all 8 when
    symmetric). n_groups = ceil(in / group_size). ``g_idx`` (int64 [in], or None for consecutive groups,
    i // group_size): the group of each input channel, as GPTQ's act-order stores it."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype = torch.float16
    g_idx: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def partial_group(self) -> int:
        """Length of the last group when ``in`` is not a multiple of the group size, else 0."""
        return self.shape[1] % self.group_size

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of each input channel (GPTQ's g_idx)."""
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.shape[1], device=self.codes.device) // self.group_size

    @property
    def chunk_unit(self) -> int:
        return self.shape[1]

    def dequantize_range(self, start: int, stop: int) -> torch.Tensor:
        """W' = (q - zero) * scale per group, in float32 (rows ``start / in`` to ``stop / in``)."""
        r0, r1 = start // self.shape[1], -(-stop // self.shape[1])
        if self.g_idx is not None:  # groups named per channel: gather each channel's parameters
            g = self.g_idx
            zeros, scales = self.zeros[r0:r1][:, g].float(), self.scales[r0:r1][:, g]
            return ((self.codes[r0:r1].float() - zeros) * scales).reshape(-1)
        return _per_group(self.codes[r0:r1], self.group_size,
                          lambda q, j: (q - self.zeros[r0:r1, j].float().unsqueeze(-1))
                          * self.scales[r0:r1, j].unsqueeze(-1))

    def storage_bits(self) -> int:
        scale_bits = 8 * self.scale_dtype.itemsize
        zero_bits = 0 if self.symmetric else 4
        return 4 * self.numel + (scale_bits + zero_bits) * self.scales.numel()


    def to_affine(self) -> AffineInt4Tensor:
        """The same weights with float offsets: W' = scale * q + offset, offset = -scale * zero.

        Exact: scale (at most float16/bfloat16 precision) times an integer 0..15 fits float32's
        mantissa, and so does scale * (q - zero), so both forms dequantize to identical float32 values.
        """
        if self.g_idx is not None:
            raise ValueError("float offsets hold consecutive groups only, not act-order groups (g_idx)")
        return AffineInt4Tensor(shape=self.shape, dtype=self.dtype, codes=self.codes, scales=self.scales,
                                offsets=-(self.scales * self.zeros.float()), group_size=self.group_size,
                                scale_dtype=self.scale_dtype)


@dataclass
class AffineInt4Tensor(QuantizedTensor):
    """4-bit codes with a float scale and a float offset per group: W'[o, i] = s[o, g] * q[o, i] + m[o, g],
    g = i // group_size (the last group may be shorter).

    codes: uint8 [out, in] in 0..15; scales: float32 [out, n_groups] (values exactly representable in
    ``scale_dtype``); offsets: float32 [out, n_groups] (any float32 value).

    Unlike an integer zero point, a float offset can absorb any update that is constant inside a
    group without touching codes or scales -- what a QA-LoRA adapter's update is -- so merging such
    an adapter into the quantized weights is exact (``compress merge``). Q4_1 in llama.cpp has the
    same form with groups of 32 and float16 scale/offset.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int
    scale_dtype: torch.dtype = torch.float16

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of each input channel."""
        return torch.arange(self.shape[1], device=self.codes.device) // self.group_size

    @property
    def chunk_unit(self) -> int:
        return self.shape[1]

    def dequantize_range(self, start: int, stop: int) -> torch.Tensor:
        """W' = scale * q + offset per group, in float32 (rows ``start / in`` to ``stop / in``)."""
        r0, r1 = start // self.shape[1], -(-stop // self.shape[1])
        return _per_group(self.codes[r0:r1], self.group_size,
                          lambda q, j: torch.addcmul(self.offsets[r0:r1, j].unsqueeze(-1), q,
                                                     self.scales[r0:r1, j].unsqueeze(-1)))

    def storage_bits(self) -> int:
        return 4 * self.numel + (8 * self.scale_dtype.itemsize + 32) * self.scales.numel()


def _per_group(codes: torch.Tensor, group_size: int, fn: Any) -> torch.Tensor:
    """float32 [rows * in]: ``fn(q, groups)`` applied to the codes [rows, in] as float32 groups of
    ``group_size`` (q [rows, n_groups, group_size], groups a slice of the group axis), the last group shorter
    when ``in`` is not a multiple; element for element the same arithmetic as gathering per-element
    parameters, without the gathered copies."""
    rows, n_in = codes.shape
    full = n_in - n_in % group_size
    out = torch.empty((rows, n_in), dtype=torch.float32, device=codes.device)
    if full:
        q = codes[:, :full].reshape(rows, full // group_size, group_size).float()
        out[:, :full] = fn(q, slice(0, full // group_size)).reshape(rows, full)
    if full < n_in:
        n_groups = full // group_size
        out[:, full:] = fn(codes[:, full:].float().unsqueeze(1), slice(n_groups, n_groups + 1)).reshape(rows, -1)
    return out.reshape(-1)


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the stored precision, never to zero (a zero scale would divide by zero)."""
    stored = scale.to(dtype)
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24  # smallest fp16 subnormal
    return stored.float().clamp_(min=tiny)


def _group_params(x: torch.Tensor, config: Int4Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, stored precision) and integer zero (float32) per group: x [..., group]."""
    lo = x.amin(dim=-1).clamp(max=0)
    hi = x.amax(dim=-1).clamp(min=0)
    if config.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = _round_scale((hi - lo) / 15, config.scale_dtype)
    zero = torch.full_like(scale, 8.0) if config.symmetric else torch.round(-lo / scale).clamp_(0, 15)
    return scale, zero


def quantize_int4(W: torch.Tensor, config: Int4Config = Int4Config()) -> Int4Tensor:
    """Quantize W: [out, in] (float16/bfloat16/float32) group-wise along ``in`` to 4-bit codes."""
    check_float_matrix(W)
    if W.dim() != 2:
        raise ValueError(f"INT4 group-wise quantization needs a 2-D weight [out, in], got shape {tuple(W.shape)}")
    out_features, in_features = W.shape
    gs = config.group_size
    full = in_features - in_features % gs
    n_groups = -(-in_features // gs)
    codes = torch.empty((out_features, in_features), dtype=torch.uint8, device=W.device)
    scales = torch.empty((out_features, n_groups), dtype=torch.float32, device=W.device)
    zeros = torch.empty((out_features, n_groups), dtype=torch.float32, device=W.device)
    rows = max(CHUNK_ELEMENTS // max(in_features, 1), 1)
    for r0 in range(0, out_features, rows):
        r1 = min(r0 + rows, out_features)
        x = W[r0:r1].float()
        if full:
            xg = x[:, :full].reshape(r1 - r0, full // gs, gs)
            s, z = _group_params(xg, config)
            q = torch.round(xg / s.unsqueeze(-1)).add_(z.unsqueeze(-1)).clamp_(0, 15)
            codes[r0:r1, :full] = q.reshape(r1 - r0, full).to(torch.uint8)
            scales[r0:r1, : full // gs], zeros[r0:r1, : full // gs] = s, z
        if full < in_features:  # the partial last group
            xt = x[:, full:]
            s, z = _group_params(xt, config)
            q = torch.round(xt / s.unsqueeze(-1)).add_(z.unsqueeze(-1)).clamp_(0, 15)
            codes[r0:r1, full:] = q.to(torch.uint8)
            scales[r0:r1, -1], zeros[r0:r1, -1] = s, z
    return Int4Tensor(shape=(out_features, in_features), dtype=W.dtype, codes=codes, scales=scales,
                      zeros=zeros.to(torch.uint8), group_size=gs, symmetric=config.symmetric,
                      scale_dtype=config.scale_dtype)
