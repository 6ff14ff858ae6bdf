"""GPTQ int4 layout (transformers/optimum/gptqmodel, vLLM, TGI, exllama).

Per quantized Linear ``P`` with in = in_features, out = out_features, G = group size
(shared/reference/formats.md, section 2):

    P.qweight  int32 [in / 8, out]          input row 8r + j in bits 4j..4j+3 of qweight[r, o]
    P.qzeros   int32 [n_groups, out / 8]    zero points packed the same way along the output dim
    P.scales   float16 [n_groups, out]
    P.g_idx    int32 [in]                   the group of input i: i // G, or with act-order (desc_act) the
                                            group GPTQ rounded it in (read and written)

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])

``checkpoint_format`` "gptq" (v1) stores z - 1, which loaders undo by adding 1 to every nibble; a
v1 nibble for z = 0 would underflow into its neighbour, so asymmetric checkpoints (which can have
z = 0) are written as "gptq_v2", which stores z itself. Symmetric ones are written as v1, the form
every loader reads. n_groups = ceil(in / G): a shorter last group is expressed through g_idx.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from compress.catalog import FORMATS as FORMAT_INFO
from compress.formats.base import WeightFormat, module_name
from compress.formats.writer import TensorSpec
from compress.quant.base import QuantizedTensor
from compress.quant.int4 import Int4Config, Int4Tensor


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """uint8 [8k, m] in 0..15 -> int32 [k, m]: row 8r + j goes to bits 4j..4j+3 of row r. The words are built
    one nibble at a time in int32 (two's complement: the top nibble lands in the sign bit, as the stored word
    has it), so no temporary is larger than the packed result."""
    rows, cols = q.shape
    q = q.contiguous().reshape(rows // 8, 8, cols)
    words = q[:, 0].to(torch.int32)
    for j in range(1, 8):
        words |= q[:, j].to(torch.int32) << (4 * j)
    return words


def pack_int4_cols(q: torch.Tensor) -> torch.Tensor:
    """uint8 [m, 8k] in 0..15 -> int32 [m, k]: column 8r + j goes to bits 4j..4j+3 of column r.

    Codes 2i and 2i + 1 make byte i (low and high nibble); four such bytes read as one little-endian int32
    are exactly the word, sign bit included, so packing is one pass over the codes."""
    n = q.shape[1]
    if n % 8:
        raise ValueError(f"pack_int4_cols needs a multiple of 8 columns, got {n}")
    if sys.byteorder != "little":  # pragma: no cover - the word layout below is little-endian
        return pack_int4_rows(q.t()).t().contiguous()
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous().view(torch.int32)


def unpack_int4_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 [k, m] -> uint8 [8k, m] (inverse of :func:`pack_int4_rows`), one nibble at a time."""
    k, m = words.shape
    out = torch.empty((k, 8, m), dtype=torch.uint8, device=words.device)
    for j in range(8):
        out[:, j] = (words >> (4 * j)) & 0xF  # arithmetic shift: the mask keeps the nibble
    return out.reshape(8 * k, m)


class GptqFormat(WeightFormat):
    name = "gptq"
    summary, methods = FORMAT_INFO[name].summary, FORMAT_INFO[name].methods
    parts = ("qweight", "qzeros", "scales", "g_idx")

    def unsupported(self, shape: tuple[int, ...], config: Any) -> str | None:
        if len(shape) != 2:
            return f"GPTQ holds Linear weights [out, in], not shape {list(shape)}"
        out_features, in_features = shape
        if in_features % 8 or out_features % 8:
            return (f"GPTQ packs 8 codes per int32: shape [{out_features}, {in_features}] needs both sizes "
                    "multiples of 8")
        return None

    def packed_specs(self, weight_name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     config: Int4Config) -> list[TensorSpec]:
        out_features, in_features = shape
        groups = -(-in_features // config.group_size)
        p = module_name(weight_name)
        return [
            TensorSpec(f"{p}.qweight", torch.int32, (in_features // 8, out_features)),
            TensorSpec(f"{p}.qzeros", torch.int32, (groups, out_features // 8)),
            TensorSpec(f"{p}.scales", torch.float16, (groups, out_features)),
            TensorSpec(f"{p}.g_idx", torch.int32, (in_features,)),
        ]

    def pack(self, weight_name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(qt, Int4Tensor)
        p = module_name(weight_name)
        stored_zeros = qt.zeros - 1 if qt.symmetric else qt.zeros  # v1 stores z - 1 (8 -> 7)
        return {
            f"{p}.qweight": pack_int4_cols(qt.codes).t().contiguous(),  # = pack_int4_rows(codes.t()), faster
            # zeros [out, groups]: pack 8 output channels per word, then store as [groups, out / 8]
            f"{p}.qzeros": pack_int4_rows(stored_zeros).t().contiguous(),
            f"{p}.scales": qt.scales.t().to(torch.float16).contiguous(),
            f"{p}.g_idx": qt.group_index().to(torch.int32),
        }

    def quantization_config(self, config: Int4Config, dtype: torch.dtype, kept_modules: list[str],
                            quantized_modules: list[str]) -> dict[str, Any]:
        qc: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": config.group_size,
            "desc_act": config.desc_act,
            "sym": config.symmetric,
            "checkpoint_format": "gptq" if config.symmetric else "gptq_v2",
        }
        return qc

    def original_shape(self, weight_name: str, stored_shapes: dict[str, tuple[int, ...]],
                       read: Callable[[str], torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype | None]:
        p = module_name(weight_name)
        for part in ("g_idx", "scales"):
            if f"{p}.{part}" not in stored_shapes:
                raise ValueError(f"'{p}.{part}' is missing")
        return (stored_shapes[f"{p}.scales"][-1], stored_shapes[f"{p}.g_idx"][0]), None

    def unpack(self, weight_name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
               dtype: torch.dtype) -> QuantizedTensor:
        p = module_name(weight_name)
        if int(quantization_config.get("bits", 4)) != 4:
            raise ValueError(f"only 4-bit GPTQ is supported, got bits={quantization_config.get('bits')}")
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            if f"{p}.{part}" not in tensors:
                raise ValueError(f"'{p}.{part}' is missing")
        # g_idx is the one tensor whose length is in_features itself; check the others against it.
        in_features = tensors[f"{p}.g_idx"].numel()
        out_features = tensors[f"{p}.scales"].shape[-1]
        group = int(quantization_config.get("group_size", -1))
        groups = -(-in_features // group) if group > 0 else 1
        expected = {"qweight": (in_features // 8, out_features), "qzeros": (groups, out_features // 8),
                    "scales": (groups, out_features)}
        for part, shape in expected.items():
            if tuple(tensors[f"{p}.{part}"].shape) != shape:
                raise ValueError(f"'{p}.{part}' has shape {list(tensors[f'{p}.{part}'].shape)}, expected "
                                 f"{list(shape)} for in={in_features}, out={out_features}, group_size={group}")
        codes = unpack_int4_rows(tensors[f"{p}.qweight"]).t().contiguous()  # [out, in]
        zeros = unpack_int4_rows(tensors[f"{p}.qzeros"].t().contiguous())  # [out, groups]
        if quantization_config.get("checkpoint_format", "gptq") != "gptq_v2":
            zeros = (zeros.to(torch.int16) + 1).to(torch.uint8)  # v1 stores z - 1
        scales = tensors[f"{p}.scales"].float().t().contiguous()  # [out, groups]
        g_idx = tensors[f"{p}.g_idx"].long()
        out_features, in_features = codes.shape
        group_size = int(quantization_config.get("group_size", -1))
        if group_size <= 0:
            group_size = in_features
        consecutive = torch.equal(g_idx, torch.arange(in_features) // group_size)
        if not consecutive and (g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[1])):
            raise ValueError(f"'{p}.g_idx' names groups outside 0..{scales.shape[1] - 1}")
        return Int4Tensor(shape=(out_features, in_features), dtype=dtype, codes=codes, scales=scales,
                          zeros=zeros,
                          group_size=group_size, symmetric=bool(quantization_config.get("sym", False)),
                          scale_dtype=torch.float16, g_idx=None if consecutive else g_idx)
