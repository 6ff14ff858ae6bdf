"""GPTQ onto llama.cpp's block types: the block scales (and minimums) of a quantized tensor are kept, only the codes
are chosen again by GPTQ (:func:`compress.quant.gptq.gptq_round`), and the result is repacked into the same
block bytes, so llama.cpp loads it as any file of that type.

Every GGML type decodes element by element as an affine function of its code, value = s * q + o, with s and o
fixed by the element's block: Q4_0 s = d, o = -8 d (q in 0..15); Q5_0 o = -16 d (0..31); Q4_1/Q5_1 s = d, o = m;
Q8_0 s = d, o = 0 (int8 codes); Q4_K/Q5_K s = d * sc_j, o = -dmin * m_j (sub-block j, 0..15 / 0..31); Q6_K
s = d * sc_j, o = -32 s (0..63). :func:`element_grid` reads s and o off the tensor itself (decoding it with every
code 0 and every code 1), so one rounder serves every type. Elements whose s is 0 (a sub-block stored as zero)
keep their code: the bytes of such blocks stay those of the grid.

Pure: float32 on the device of W.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from compress.quant.ggml import GGMLTensor
from compress.quant.gptq import ColumnRounder, GPTQConfig, gptq_round
from compress.quant.kquants import (
    KQuantTensor,
    _pack_high_bits,
    _pack_nibbles,
    _pack_q6,
    _unpack_high_bits,
    _unpack_nibbles,
    _unpack_q6,
)

GGMLQuantized = GGMLTensor | KQuantTensor

# code range of each type: (lowest, highest)
CODE_RANGES = {"q4_0": (0, 15), "q4_1": (0, 15), "q5_0": (0, 31), "q5_1": (0, 31), "q8_0": (-128, 127),
               "q4_k": (0, 15), "q5_k": (0, 31), "q6_k": (0, 63)}


def element_codes(qt: GGMLQuantized) -> torch.Tensor:
    """The code of every element, int16 [*shape] (Q8_0's signed)."""
    if isinstance(qt, GGMLTensor):
        return qt.codes.to(torch.int16)
    b = qt.blocks
    if qt.qtype == "q4_k":
        codes = _unpack_nibbles(b[:, 16:144])
    elif qt.qtype == "q5_k":
        codes = _unpack_nibbles(b[:, 48:176]) | (_unpack_high_bits(b[:, 16:48]) << 4)
    elif qt.qtype == "q6_k":
        codes = _unpack_q6(b[:, :128], b[:, 128:192])
    else:
        raise TypeError(f"no codes for {qt.qtype}")
    return codes.to(torch.int16).reshape(qt.shape)


def with_codes(qt: GGMLQuantized, codes: torch.Tensor) -> GGMLQuantized:
    """``qt`` with every element's code replaced by ``codes`` (integers [*shape] in the type's range); the block
    scales and minimums are unchanged."""
    low, high = CODE_RANGES[qt.qtype]
    if int(codes.min()) < low or int(codes.max()) > high:
        raise ValueError(f"{qt.qtype} codes must lie in {low}..{high}")
    if isinstance(qt, GGMLTensor):
        dtype = torch.int8 if qt.qtype == "q8_0" else torch.uint8
        return replace(qt, codes=codes.to(dtype).reshape(qt.shape).contiguous())
    q = codes.reshape(-1, 256).to(torch.uint8)
    blocks = qt.blocks.clone()
    if qt.qtype == "q4_k":
        blocks[:, 16:144] = _pack_nibbles(q)
    elif qt.qtype == "q5_k":
        blocks[:, 16:48] = _pack_high_bits(q)
        blocks[:, 48:176] = _pack_nibbles(q & 0xF)
    else:
        blocks[:, :128], blocks[:, 128:192] = _pack_q6(q)
    return replace(qt, blocks=blocks)


@dataclass(frozen=True)
class ElementGrid:
    """value = scale * q + offset per element (float32 [out, in] each), q in [low, high]; ``codes`` int16 [out, in]:
    the grid's own codes (kept where scale is 0)."""

    scale: torch.Tensor
    offset: torch.Tensor
    codes: torch.Tensor
    low: int
    high: int


def element_grid(qt: GGMLQuantized) -> ElementGrid:
    """The affine grid of every element of a 2-D quantized tensor (module docstring)."""
    if len(qt.shape) != 2:
        raise ValueError(f"GPTQ needs a matrix [out, in], got shape {qt.shape}")
    low, high = CODE_RANGES[qt.qtype]
    zeros = torch.zeros(qt.shape, dtype=torch.int16, device=_device(qt))
    v0 = with_codes(qt, zeros).dequantize(torch.float32)
    v1 = with_codes(qt, zeros + 1).dequantize(torch.float32)
    return ElementGrid(v1 - v0, v0, element_codes(qt), low, high)


def _device(qt: GGMLQuantized) -> torch.device:
    return qt.codes.device if isinstance(qt, GGMLTensor) else qt.blocks.device


def element_rounder(grid: ElementGrid) -> ColumnRounder:
    """Nearest code on each element's own grid; codes come back shifted to 0.. (minus ``grid.low``) as uint8."""
    scale_t, offset_t = grid.scale.t().contiguous(), grid.offset.t().contiguous()
    codes_t = grid.codes.t().float().contiguous()
    one = torch.ones((), device=scale_t.device)

    def round_column(j: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = scale_t[j], offset_t[j]
        live = s != 0
        q = torch.where(live, torch.round((w - o) / torch.where(live, s, one)), codes_t[j]).clamp_(grid.low, grid.high)
        return (q - grid.low).to(torch.uint8), torch.addcmul(o, q, s)

    return round_column


def gptq_ggml(W: torch.Tensor, H: torch.Tensor, grid: GGMLQuantized,
              config: GPTQConfig | None = None) -> GGMLQuantized:
    """GPTQ of W: [out, in] (rows in the order the file stores them) given H: [in, in], onto the block scales of
    ``grid`` (a quantization of W to a llama.cpp type): the same type with GPTQ's codes."""
    eg = element_grid(grid)
    codes = gptq_round(W.float(), H, element_rounder(eg), config or GPTQConfig())
    return with_codes(grid, codes.to(torch.int16) + eg.low)
