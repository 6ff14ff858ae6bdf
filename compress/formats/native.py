"""compress' own INT4 layout with float offsets ("native"), read back by ``compress dequantize``.

Why a layout of our own: GPTQ and compressed-tensors store integer zero points, NF4 has none, so an
update that is constant inside each quantization group (a QA-LoRA adapter) cannot be merged into
them without re-rounding. A float offset per group absorbs such an update exactly. The layout is
plain safetensors inside a Hugging Face folder; per quantized Linear ``P`` with W: [out, in],
G = group size, n_groups = ceil(in / G):

    P.qcodes    uint8   [out, in / 2]       code of input 2j in the low nibble of byte j, 2j + 1 in the high
    P.qscales   float16 [out, n_groups]     (the dtype of ``scale_dtype``: float16, bfloat16 or float32)
    P.qoffsets  float32 [out, n_groups]

    W'[o, i] = qscales[o, i // G] * q[o, i] + qoffsets[o, i // G]       (computed in float32)

config.json carries ``"quantization_config": {"quant_method": "compress", "format": "int4-affine",
"bits": 4, "group_size": G, "scale_dtype": ..., "offset_dtype": "float32", "modules_not_converted":
[...]}``. No inference engine reads it directly: it is the exact intermediate a merge produces,
dequantized by ``compress dequantize`` (or re-exported to GGUF Q4_1 when G = 32). ``in`` must be
even (two codes per byte); the last group may be shorter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from compress.catalog import FORMATS as FORMAT_INFO
from compress.formats.base import WeightFormat, dtype_name, module_name, parse_dtype
from compress.formats.writer import TensorSpec
from compress.quant.base import QuantizedTensor
from compress.quant.int4 import AffineInt4Tensor, Int4Config, Int4Tensor

QUANT_METHOD = "compress"
LAYOUT = "int4-affine"
PARTS = ("qcodes", "qscales", "qoffsets")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, 2k] in 0..15 -> uint8 [out, k]: element 2j in the low nibble, 2j + 1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, k] -> uint8 [out, 2k] (inverse of :func:`pack_nibbles`)."""
    out = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out


class NativeFormat(WeightFormat):
    name = "native"
    summary, methods = FORMAT_INFO[name].summary, FORMAT_INFO[name].methods
    parts = PARTS
    float_offsets = True

    def unsupported(self, shape: tuple[int, ...], config: Any) -> str | None:
        if len(shape) != 2:
            return f"the native layout holds Linear weights [out, in], not shape {list(shape)}"
        if shape[1] % 2:
            return f"the native layout packs 2 codes per byte: in = {shape[1]} must be even"
        return None

    def packed_specs(self, weight_name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     config: Int4Config) -> list[TensorSpec]:
        out_features, in_features = shape
        groups = -(-in_features // config.group_size)
        p = module_name(weight_name)
        return [
            TensorSpec(f"{p}.qcodes", torch.uint8, (out_features, in_features // 2)),
            TensorSpec(f"{p}.qscales", config.scale_dtype, (out_features, groups)),
            TensorSpec(f"{p}.qoffsets", torch.float32, (out_features, groups)),
        ]

    def pack(self, weight_name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if isinstance(qt, Int4Tensor):
            qt = qt.to_affine()
        if not isinstance(qt, AffineInt4Tensor):
            raise TypeError(f"the native layout stores INT4 tensors, got {type(qt).__name__}")
        p = module_name(weight_name)
        return {
            f"{p}.qcodes": pack_nibbles(qt.codes),
            f"{p}.qscales": qt.scales.to(qt.scale_dtype).contiguous(),
            f"{p}.qoffsets": qt.offsets.float().contiguous(),
        }

    def quantization_config(self, config: Int4Config, dtype: torch.dtype, kept_modules: list[str],
                            quantized_modules: list[str]) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": LAYOUT, "bits": 4, "group_size": config.group_size,
                "scale_dtype": dtype_name(config.scale_dtype), "offset_dtype": "float32",
                "modules_not_converted": kept_modules}

    def original_shape(self, weight_name: str, stored_shapes: dict[str, tuple[int, ...]],
                       read: Callable[[str], torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype | None]:
        p = module_name(weight_name)
        if f"{p}.qcodes" not in stored_shapes:
            raise ValueError(f"'{p}.qcodes' is missing")
        out_features, half = stored_shapes[f"{p}.qcodes"]
        return (out_features, 2 * half), None

    def unpack(self, weight_name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
               dtype: torch.dtype) -> QuantizedTensor:
        p = module_name(weight_name)
        if quantization_config.get("format", LAYOUT) != LAYOUT or int(quantization_config.get("bits", 4)) != 4:
            raise ValueError(f"unknown native layout {quantization_config.get('format')!r} "
                             f"(bits={quantization_config.get('bits')}); this version reads {LAYOUT}, 4 bits")
        for part in PARTS:
            if f"{p}.{part}" not in tensors:
                raise ValueError(f"'{p}.{part}' is missing")
        group = int(quantization_config.get("group_size", 0))
        if group <= 0:
            raise ValueError(f"group_size must be positive, got {quantization_config.get('group_size')!r}")
        packed = tensors[f"{p}.qcodes"]
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"'{p}.qcodes' must be a 2-D uint8 tensor, got {packed.dtype} {list(packed.shape)}")
        out_features, in_features = packed.shape[0], 2 * packed.shape[1]
        groups = -(-in_features // group)
        for part in ("qscales", "qoffsets"):
            if tuple(tensors[f"{p}.{part}"].shape) != (out_features, groups):
                raise ValueError(f"'{p}.{part}' has shape {list(tensors[f'{p}.{part}'].shape)}, expected "
                                 f"{[out_features, groups]} for in={in_features}, group_size={group}")
        scale_dtype = parse_dtype(quantization_config.get("scale_dtype", "float16"))
        return AffineInt4Tensor(shape=(out_features, in_features), dtype=dtype, codes=unpack_nibbles(packed),
                                scales=tensors[f"{p}.qscales"].float(), offsets=tensors[f"{p}.qoffsets"].float(),
                                group_size=group, scale_dtype=scale_dtype)
