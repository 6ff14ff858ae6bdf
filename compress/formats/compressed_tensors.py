"""compressed-tensors "pack-quantized" layout: W4A16 group-wise INT4 (vLLM, llm-compressor, transformers).

What compressed-tensors (checked against 0.20.1: ``PackedQuantizationCompressor``, ``pack_to_int32``,
``initialize_module_for_quantization``) writes per quantized Linear ``P`` with W: [out, in], G = group
size, n_groups = in / G:

    P.weight_packed      int32 [out, in / 8]         code of input i in bits 4*(i % 8).. of word i // 8
    P.weight_scale       model dtype [out, n_groups]
    P.weight_shape       int64 [2]                   [out, in]
    P.weight_zero_point  int32 [out / 8, n_groups]   asymmetric only; zero of output o in bits
                                                     4*(o % 8).. of row o // 8 (packed along dim 0)

compressed-tensors works with signed values: q_s in [-8, 7] and zero points z_s in [-8, 7], and packs
each as the nibble q_s + 8. Our unsigned codes q = q_s + 8 and zeros z = z_s + 8 (0..15) are therefore
stored as they are: the nibbles hold exactly our q and z, and

    W'[o, i] = scale[o, i // G] * (q_s - z_s) = scale[o, i // G] * (q[o, i] - z[o, i // G])

Symmetric schemes store no zero point (z_s = 0, i.e. our z = 8). The scale is kept in the model's
dtype because the loader creates ``weight_scale`` in the module dtype and casts what it reads into
it; :meth:`CompressedTensorsFormat.adapt_config` makes the quantizer round its scales to that dtype,
so that codes, stored scales and loaded scales agree.

Limits of the layout as its readers implement it: compressed-tensors' group dequantization needs
``in % G == 0`` (no shorter last group); vLLM allocates ``weight_zero_point`` as [out // 8, n_groups],
so asymmetric layers need ``out % 8 == 0``. Such layers are kept in float.

config.json gets (as ``ModelCompressor.update_config`` writes it)::

    {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
        "symmetric": ..., "group_size": G, "strategy": "group", "dynamic": false, ...},
        "format": "pack-quantized", ...}},
     "ignore": [modules kept in float, always including "lm_head" unless it was quantized], ...}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from compress.catalog import FORMATS as FORMAT_INFO
from compress.formats.base import WeightFormat, module_name
from compress.formats.gptq import pack_int4_cols, pack_int4_rows, unpack_int4_rows
from compress.formats.writer import TensorSpec
from compress.quant.base import QuantizedTensor
from compress.quant.int4 import SCALE_DTYPES, Int4Config, Int4Tensor

QUANT_METHOD = "compressed-tensors"
LAYOUT = "pack-quantized"
# The compressed-tensors release whose writer and loaders this layout was checked against (the
# "version" entry that its ModelCompressor.update_config writes into quantization_config).
CHECKED_VERSION = "0.20.1"
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def unpack_int4_cols(words: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [m, k] -> uint8 [m, cols] (inverse of :func:`pack_int4_cols`; cols <= 8k drops padding)."""
    return unpack_int4_rows(words.t().contiguous())[:cols].t().contiguous()


def _weights_args(quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The ``weights`` arguments of the (single) config group, validated for what we can read."""
    groups = quantization_config.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"expected exactly one config group in quantization_config, found {len(groups)}")
    scheme = next(iter(groups.values()))
    args = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(args, dict):
        raise ValueError("the config group has no 'weights' arguments")
    fmt = scheme.get("format") or quantization_config.get("format")
    if fmt != LAYOUT:
        raise ValueError(f"only the '{LAYOUT}' format is supported, got {fmt!r}")
    if int(args.get("num_bits", 0)) != 4 or args.get("type", "int") != "int":
        raise ValueError(f"only 4-bit integer weights are supported, got num_bits={args.get('num_bits')} "
                         f"type={args.get('type')!r}")
    if args.get("strategy") not in ("group", "channel"):
        raise ValueError(f"only the 'group' and 'channel' strategies are supported, got {args.get('strategy')!r}")
    if args.get("actorder") not in (None, "weight", "static"):
        raise ValueError(f"activation order {args.get('actorder')!r} (a g_idx permutation) is not supported")
    return args


class CompressedTensorsFormat(WeightFormat):
    name = "compressed-tensors"
    summary, methods = FORMAT_INFO[name].summary, FORMAT_INFO[name].methods
    parts = PARTS

    def adapt_config(self, config: Any, dtype: torch.dtype) -> Any:
        """Round scales to the model dtype: the loader casts ``weight_scale`` into the module dtype."""
        if isinstance(config, Int4Config) and dtype in SCALE_DTYPES and config.scale_dtype != dtype:
            return replace(config, scale_dtype=dtype)
        return config

    def unsupported(self, shape: tuple[int, ...], config: Any) -> str | None:
        if len(shape) != 2:
            return f"compressed-tensors pack-quantized holds Linear weights [out, in], not shape {list(shape)}"
        out_features, in_features = shape
        if in_features % config.group_size:
            return (f"compressed-tensors needs the input size to be a multiple of the group size: in={in_features}, "
                    f"group size {config.group_size}")
        if not config.symmetric and out_features % 8:
            return (f"asymmetric zero points are packed 8 output channels per int32 and vLLM needs out % 8 == 0: "
                    f"out={out_features}")
        return None

    def packed_specs(self, weight_name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     config: Int4Config) -> list[TensorSpec]:
        out_features, in_features = shape
        groups = in_features // config.group_size
        p = module_name(weight_name)
        specs = [
            TensorSpec(f"{p}.weight_packed", torch.int32, (out_features, -(-in_features // 8))),
            TensorSpec(f"{p}.weight_scale", config.scale_dtype, (out_features, groups)),
            TensorSpec(f"{p}.weight_shape", torch.int64, (2,)),
        ]
        if not config.symmetric:
            specs.append(TensorSpec(f"{p}.weight_zero_point", torch.int32, (-(-out_features // 8), groups)))
        return specs

    def pack(self, weight_name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(qt, Int4Tensor)
        p = module_name(weight_name)
        out_features, in_features = qt.shape
        if in_features % qt.group_size:
            raise ValueError(f"{p}: in={in_features} is not a multiple of the group size {qt.group_size}")
        codes = qt.codes
        if in_features % 8:  # cannot happen for group sizes >= 16; kept for completeness (padding nibbles 0)
            codes = torch.nn.functional.pad(codes, (0, 8 - in_features % 8))
        packed = {
            f"{p}.weight_packed": pack_int4_cols(codes),
            f"{p}.weight_scale": qt.scales.to(qt.scale_dtype).contiguous(),
            f"{p}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if not qt.symmetric:
            zeros = qt.zeros
            if out_features % 8:
                zeros = torch.nn.functional.pad(zeros, (0, 0, 0, 8 - out_features % 8))
            packed[f"{p}.weight_zero_point"] = pack_int4_rows(zeros).contiguous()
        return packed

    def quantization_config(self, config: Int4Config, dtype: torch.dtype, kept_modules: list[str],
                            quantized_modules: list[str]) -> dict[str, Any]:
        # Targets are the Linear class: every Linear not quantized must be ignored, including a tied
        # lm_head (no tensor of its own in the checkpoint, so it is in neither list).
        quantized = {module_name(w) for w in quantized_modules}
        ignore = list(dict.fromkeys(kept_modules))
        if "lm_head" not in quantized and "lm_head" not in ignore:
            ignore.append("lm_head")
        weights = {"num_bits": 4, "type": "int", "symmetric": config.symmetric, "group_size": config.group_size,
                   "strategy": "group", "dynamic": False}
        return {
            "version": CHECKED_VERSION,
            "quant_method": QUANT_METHOD,
            "format": LAYOUT,
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                            "output_activations": None, "format": LAYOUT},
            },
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "moe_sparsity_config": None,
            "sparsity_config": {},
            "transform_config": {},
        }

    def original_shape(self, weight_name: str, stored_shapes: dict[str, tuple[int, ...]],
                       read: Callable[[str], torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype | None]:
        p = module_name(weight_name)
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            if f"{p}.{part}" not in stored_shapes:
                raise ValueError(f"'{p}.{part}' is missing")
        if stored_shapes[f"{p}.weight_shape"] != (2,):
            raise ValueError(f"'{p}.weight_shape' has shape {list(stored_shapes[f'{p}.weight_shape'])}, expected [2]")
        out_features, in_features = (int(v) for v in read(f"{p}.weight_shape").tolist())
        return (out_features, in_features), None

    def unpack(self, weight_name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
               dtype: torch.dtype) -> QuantizedTensor:
        p = module_name(weight_name)
        args = _weights_args(quantization_config)
        symmetric = bool(args.get("symmetric", True))
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            if f"{p}.{part}" not in tensors:
                raise ValueError(f"'{p}.{part}' is missing")
        if not symmetric and f"{p}.weight_zero_point" not in tensors:
            raise ValueError(f"'{p}.weight_zero_point' is missing (the scheme is asymmetric)")
        shape = tensors[f"{p}.weight_shape"]
        if shape.numel() != 2:
            raise ValueError(f"'{p}.weight_shape' holds {shape.numel()} values, expected [out, in]")
        out_features, in_features = (int(v) for v in shape.tolist())
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"'{p}.weight_shape' is {[out_features, in_features]}")
        group = int(args.get("group_size") or -1) if args.get("strategy") == "group" else in_features
        if group <= 0 or in_features % group:
            raise ValueError(f"in={in_features} is not a multiple of the group size {group}")
        groups = in_features // group
        expected = {"weight_packed": ((out_features, -(-in_features // 8)), torch.int32),
                    "weight_scale": ((out_features, groups), None)}
        if not symmetric:
            expected["weight_zero_point"] = ((-(-out_features // 8), groups), torch.int32)
        for part, (want, want_dtype) in expected.items():
            t = tensors[f"{p}.{part}"]
            if tuple(t.shape) != want:
                raise ValueError(f"'{p}.{part}' has shape {list(t.shape)}, expected {list(want)} for "
                                 f"in={in_features}, out={out_features}, group_size={group}")
            if want_dtype is not None and t.dtype != want_dtype:
                raise ValueError(f"'{p}.{part}' is {t.dtype}, expected {want_dtype}")
        scale = tensors[f"{p}.weight_scale"]
        if scale.dtype not in SCALE_DTYPES:
            raise ValueError(f"'{p}.weight_scale' is {scale.dtype}, expected float16, bfloat16 or float32")
        codes = unpack_int4_cols(tensors[f"{p}.weight_packed"], in_features)  # [out, in]
        if symmetric:
            zeros = torch.full((out_features, groups), 8, dtype=torch.uint8)
        else:
            zeros = unpack_int4_rows(tensors[f"{p}.weight_zero_point"])[:out_features].contiguous()  # [out, groups]
        return Int4Tensor(shape=(out_features, in_features), dtype=dtype, codes=codes, scales=scale.float(),
                          zeros=zeros, group_size=group, symmetric=symmetric, scale_dtype=scale.dtype)
