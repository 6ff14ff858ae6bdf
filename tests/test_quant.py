"""Quantizers against their references: bitsandbytes for NF4/FP4 (code for code), the published
GPTQ RTN formula for INT4, and reconstruction error bounds on Gaussian weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress.formats.bnb import pack_nibbles
from compress.metrics import compare
from compress.quant import METHODS, make_config
from compress.quant.int4 import Int4Config, quantize_int4
from compress.quant.nf4 import (
    BLOCK_SIZES,
    NF4Config,
    dynamic_map_signed,
    quantize_blockwise_8bit,
    quantize_nf4,
    zero_code,
)

bnb_f = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Element counts that are, and are not, multiples of every block size; one odd count.
SHAPES = [(64, 64), (300, 77), (1, 5), (33, 4097)]


def _bnb(W: torch.Tensor, block: int, quant_type: str, dq: bool):
    return bnb_f.quantize_4bit(W, blocksize=block, quant_type=quant_type, compress_statistics=dq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_codes_and_absmax_identical_to_bitsandbytes(quant_type: str, dtype: torch.dtype, block: int) -> None:
    gen = torch.Generator().manual_seed(block)
    for shape in SHAPES:
        W = (torch.randn(*shape, generator=gen) * 3).to(dtype)
        packed, state = _bnb(W, block, quant_type, dq=False)
        ours = quantize_nf4(W, NF4Config(block_size=block, quant_type=quant_type))
        assert torch.equal(pack_nibbles(ours.codes, zero_code(quant_type)), packed), (shape, dtype)
        assert torch.equal(ours.absmax, state.absmax), (shape, dtype)
        assert ours.dequantize().dtype == dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [32, 64, 256, 4096])
def test_double_quant_statistics_identical_to_bitsandbytes(quant_type: str, dtype: torch.dtype, block: int) -> None:
    gen = torch.Generator().manual_seed(7)
    # 2000 x 300 at block 32 gives 18750 blocks: 74 nested blocks of 256, the last one partial.
    for shape in [(2000, 300), (64, 64), (1, 5)]:
        W = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
        packed, state = _bnb(W, block, quant_type, dq=True)
        ours = quantize_nf4(W, NF4Config(block_size=block, double_quant=True, quant_type=quant_type))
        assert torch.equal(pack_nibbles(ours.codes, zero_code(quant_type)), packed)
        assert torch.equal(ours.absmax, state.absmax)  # the 8-bit codes of absmax - offset
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.offset == state.offset.item()


def test_dynamic_map_equals_bitsandbytes() -> None:
    assert torch.equal(dynamic_map_signed(), bnb_f.create_dynamic_map(signed=True))


def test_edge_values_ties_zeros_and_extremes() -> None:
    """Values exactly on decision boundaries, exact table values, zeros and all-zero blocks."""
    table = bnb_f.get_4bit_type("nf4", device="cpu").clone()
    mids = (table[:-1] + table[1:]) / 2
    ulp = torch.nextafter(mids, torch.tensor(2.0)) - mids
    values = torch.cat([table, mids, mids + ulp, mids - ulp, torch.zeros(64), -table])
    # Put the values in blocks whose absmax is exactly 1 so that s == value.
    values = torch.cat([values, torch.zeros((-values.numel()) % 64)]).reshape(-1, 64)
    values[:, 0] = 1.0
    W = values.reshape(-1)
    for quant_type in ("nf4", "fp4"):
        packed, state = _bnb(W, 64, quant_type, dq=False)
        ours = quantize_nf4(W, NF4Config(64, quant_type=quant_type))
        assert torch.equal(pack_nibbles(ours.codes, zero_code(quant_type)), packed)
        assert torch.equal(ours.absmax, state.absmax)


def test_dequantize_formula_and_error_bound() -> None:
    """dequant = table[code] * absmax[block]; NF4 b64 error on N(0,1) as bitsandbytes' tests report."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(1024, 1024, generator=gen)
    q = quantize_nf4(W, NF4Config(64))
    table = bnb_f.get_4bit_type("nf4", device="cpu").clone()
    expected = (table[q.codes.long()].reshape(-1, 64) * q.absmax[:, None]).reshape(W.shape)
    assert torch.equal(q.dequantize(), expected)
    mae = (q.dequantize() - W).abs().mean().item()
    assert 0.070 < mae < 0.075  # bitsandbytes' own test: 0.0728 at block 64
    assert 0.088 < compare(W, q.dequantize()).rel_fro < 0.095
    assert q.bits_per_weight == 4.5
    dq = quantize_nf4(W, NF4Config(64, double_quant=True))
    assert abs(dq.bits_per_weight - 4.127) < 0.01
    # Double quantization changes the scales only slightly.
    assert compare(W, dq.dequantize()).rel_fro < compare(W, q.dequantize()).rel_fro * 1.01


def test_8bit_blockwise_matches_bitsandbytes_on_awkward_input() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(1000, generator=gen), torch.zeros(256), torch.randn(37, generator=gen) * 1e-6])
    codes, absmax, _ = quantize_blockwise_8bit(x, 256)
    ref_codes, ref_state = bnb_f.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_state.absmax)


# ---- INT4 -------------------------------------------------------------------------------------

def _rtn_reference(W: torch.Tensor, group: int, sym: bool) -> torch.Tensor:
    """The published GPTQ RTN formula, one group at a time in float64 (fp16 scales), as a check."""
    out = torch.empty_like(W, dtype=torch.float64)
    for r, g0 in itertools.product(range(W.shape[0]), range(0, W.shape[1], group)):
        w = W[r, g0 : g0 + group].double()
        lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
        if sym:
            hi = max(-lo, hi)
            lo = -hi
        if lo == 0 and hi == 0:
            lo, hi = -1.0, 1.0
        scale = float(torch.tensor((hi - lo) / 15, dtype=torch.float32).half())
        zero = 8.0 if sym else min(max(round(-lo / scale), 0), 15)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 15)
        out[r, g0 : g0 + group] = scale * (q - zero)
    return out


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("in_features", [256, 200])  # 200: a partial last group for every size
def test_int4_matches_published_formula(group: int, sym: bool, in_features: int) -> None:
    gen = torch.Generator().manual_seed(group + in_features)
    W = torch.randn(24, in_features, generator=gen)
    W[3, :group] = 0  # an all-zero group
    q = quantize_int4(W, Int4Config(group_size=group, symmetric=sym))
    assert q.scales.shape == (24, -(-in_features // group))
    assert q.codes.max() <= 15
    ref = _rtn_reference(W, group, sym)
    # Identical up to float32 vs float64 rounding of w / scale at exact .5 ties (none expected here).
    assert torch.allclose(q.dequantize(torch.float64), ref, rtol=0, atol=1e-6)
    if sym:
        assert bool((q.zeros == 8).all())


@pytest.mark.parametrize(("group", "sym", "bound"), [(32, False, 0.083), (64, False, 0.093), (128, False, 0.102),
                                                     (128, True, 0.112)])
def test_int4_error_on_gaussian_weights(group: int, sym: bool, bound: float) -> None:
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(512, 1024, generator=gen)
    q = quantize_int4(W, Int4Config(group_size=group, symmetric=sym))
    err = compare(W, q.dequantize()).rel_fro
    assert bound - 0.01 < err < bound  # algorithms.md: g32 0.081, g64 0.091, g128 0.100, sym g128 ~0.11


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantizers_return_callers_dtype_and_shape(dtype: torch.dtype) -> None:
    W = torch.randn(16, 256).to(dtype)  # whole blocks for every method (the K-quants need 256)
    for name in METHODS:
        cfg = make_config(name, block_size=32, group_size=32)
        q = METHODS[name].quantize(W, cfg)
        out = q.dequantize()
        assert out.dtype == dtype and out.shape == W.shape


def test_configs_validate_themselves() -> None:
    with pytest.raises(ValueError, match="block size 100"):
        NF4Config(block_size=100)
    with pytest.raises(ValueError, match="group size 48"):
        Int4Config(group_size=48)
    with pytest.raises(ValueError, match="quant_type"):
        NF4Config(quant_type="nf3")
    with pytest.raises(TypeError):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int8))
