"""transformers' pre-quantized bitsandbytes 4-bit layout (NF4 / FP4, optional double quant).

Per quantized Linear with weight ``P.weight`` (shared/reference/formats.md, section 1):

    P.weight                                  uint8 [(n + 1) // 2, 1]   two codes per byte, first in the high nibble
    P.weight.absmax                           float32 [n_blocks] (uint8 with double quant)
    P.weight.quant_map                        float32 [16]
    P.weight.nested_absmax                    float32 [ceil(n_blocks / 256)]   (double quant)
    P.weight.nested_quant_map                 float32 [256]                    (double quant)
    P.weight.quant_state.bitsandbytes__nf4    uint8: UTF-8 JSON {quant_type, blocksize, dtype, shape, ...}

An odd element count is padded with the code of 0.0, as bitsandbytes pads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from compress.catalog import FORMATS as FORMAT_INFO
from compress.formats.base import WeightFormat, dtype_name, module_name, parse_dtype
from compress.formats.writer import TensorSpec
from compress.quant.base import QuantizedTensor
from compress.quant.nf4 import NESTED_BLOCK_SIZE, TABLES, NF4Config, NF4Tensor, zero_code

STATE_PREFIX = ".quant_state.bitsandbytes__"


def _state_json(qt: NF4Tensor) -> bytes:
    state: dict[str, Any] = {"quant_type": qt.quant_type, "blocksize": qt.block_size,
                             "dtype": dtype_name(qt.dtype), "shape": list(qt.shape)}
    if not qt.double_quant:
        return json.dumps(state).encode()
    # The offset (a mean of absolute values, so >= 0) is written with a fixed width: 9 significant
    # digits identify a float32 exactly, and a fixed length lets shards be laid out in advance.
    assert qt.offset is not None and qt.offset >= 0
    state.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset="@OFFSET@")
    return json.dumps(state).replace('"@OFFSET@"', f"{qt.offset:.9e}").encode()


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """uint8 [n] codes -> uint8 [(n + 1) // 2, 1]: element 2k in the high nibble of byte k."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


class BnbFormat(WeightFormat):
    name = "bnb"
    summary, methods = FORMAT_INFO[name].summary, FORMAT_INFO[name].methods

    def unsupported(self, shape: tuple[int, ...], config: Any) -> str | None:
        if len(shape) != 2:
            return f"bitsandbytes 4-bit holds Linear weights [out, in], not shape {list(shape)}"
        return None

    def packed_specs(self, weight_name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     config: NF4Config) -> list[TensorSpec]:
        n = shape[0] * shape[1]
        n_blocks = -(-n // config.block_size)
        w = weight_name
        specs = [TensorSpec(w, torch.uint8, ((n + 1) // 2, 1))]
        if config.double_quant:
            specs += [TensorSpec(f"{w}.absmax", torch.uint8, (n_blocks,)),
                      TensorSpec(f"{w}.nested_absmax", torch.float32, (-(-n_blocks // NESTED_BLOCK_SIZE),)),
                      TensorSpec(f"{w}.nested_quant_map", torch.float32, (256,))]
        else:
            specs.append(TensorSpec(f"{w}.absmax", torch.float32, (n_blocks,)))
        specs.append(TensorSpec(f"{w}.quant_map", torch.float32, (16,)))
        # The JSON's length does not depend on the data: learn it from an empty tensor.
        state_len = len(_state_json(NF4Tensor(
            shape=shape, dtype=dtype, codes=torch.empty(0), absmax=torch.empty(0), block_size=config.block_size,
            quant_type=config.quant_type, nested_absmax=torch.empty(0) if config.double_quant else None,
            offset=0.0 if config.double_quant else None)))
        specs.append(TensorSpec(f"{w}{STATE_PREFIX}{config.quant_type}", torch.uint8, (state_len,)))
        return specs

    def pack(self, weight_name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        assert isinstance(qt, NF4Tensor)
        w = weight_name
        out = {w: pack_nibbles(qt.codes, zero_code(qt.quant_type))}
        out[f"{w}.absmax"] = qt.absmax
        if qt.double_quant:
            assert qt.nested_absmax is not None and qt.nested_code is not None
            out[f"{w}.nested_absmax"] = qt.nested_absmax
            out[f"{w}.nested_quant_map"] = qt.nested_code
        # + 0.0 turns FP4's -0.0 entry into +0.0, the bytes bitsandbytes stores (the values are equal)
        out[f"{w}.quant_map"] = torch.tensor(TABLES[qt.quant_type], dtype=torch.float32) + 0.0
        out[f"{w}{STATE_PREFIX}{qt.quant_type}"] = torch.frombuffer(bytearray(_state_json(qt)), dtype=torch.uint8)
        return out

    def quantization_config(self, config: NF4Config, dtype: torch.dtype, kept_modules: list[str],
                            quantized_modules: list[str]) -> dict[str, Any]:
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": config.quant_type,
            "bnb_4bit_use_double_quant": config.double_quant,
            "bnb_4bit_compute_dtype": dtype_name(dtype),
            "bnb_4bit_quant_storage": "uint8",
            # Linear layers we kept in float must not be converted by the loader; lm_head must be
            # listed explicitly once this list is set.
            "llm_int8_skip_modules": ["lm_head", *(m for m in kept_modules if m != "lm_head")],
        }

    def weight_names(self, keys: set[str]) -> list[str]:
        # A weight with absmax but no quant_state is still ours: unpack then reports what is missing.
        names = {key.split(STATE_PREFIX)[0] for key in keys if STATE_PREFIX in key}
        names |= {key.removesuffix(".absmax") for key in keys
                  if key.endswith(".weight.absmax") and key.removesuffix(".absmax") in keys}
        return sorted(names)

    def stored_keys(self, weight_name: str, keys: set[str]) -> list[str]:
        w = weight_name
        return [k for k in keys if k == w or (k.startswith(w + ".") and k[len(w) + 1:].split(".")[0] in
                                             ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                              "quant_state"))]

    def original_shape(self, weight_name: str, stored_shapes: dict[str, tuple[int, ...]],
                       read: Callable[[str], torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype | None]:
        state_key = next((k for k in stored_shapes if k.startswith(weight_name + STATE_PREFIX)), None)
        if state_key is None:
            raise ValueError(f"'{weight_name}' has no {weight_name}{STATE_PREFIX}<type> tensor")
        state = json.loads(bytes(read(state_key).tolist()).decode())
        return tuple(int(d) for d in state["shape"]), parse_dtype(state["dtype"])

    def unpack(self, weight_name: str, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any],
               dtype: torch.dtype) -> QuantizedTensor:
        w = weight_name
        state_key = next((k for k in tensors if STATE_PREFIX in k), None)
        if state_key is None:
            raise ValueError(f"'{w}' has no {w}{STATE_PREFIX}<type> tensor (its shape and dtype are lost)")
        for part in ("", ".absmax"):
            if w + part not in tensors:
                raise ValueError(f"'{w}{part}' is missing")
        state = json.loads(bytes(tensors[state_key].tolist()).decode())
        shape = tuple(int(d) for d in state["shape"])
        n = 1
        for d in shape:
            n *= d
        block = int(state["blocksize"])
        n_blocks = -(-n // block)
        if tensors[w].numel() != (n + 1) // 2:
            raise ValueError(f"'{w}' holds {tensors[w].numel()} bytes but shape {list(shape)} needs {(n + 1) // 2}")
        if tensors[f"{w}.absmax"].numel() != n_blocks:
            raise ValueError(f"'{w}.absmax' has {tensors[f'{w}.absmax'].numel()} values but {n_blocks} blocks of "
                             f"{block} need one each")
        if f"{w}.nested_absmax" in tensors:
            expected = -(-n_blocks // NESTED_BLOCK_SIZE)
            if tensors[f"{w}.nested_absmax"].numel() != expected:
                raise ValueError(f"'{w}.nested_absmax' has {tensors[f'{w}.nested_absmax'].numel()} values, "
                                 f"expected {expected}")
        qt = NF4Tensor(shape=shape, dtype=parse_dtype(state["dtype"]),
                       codes=unpack_nibbles(tensors[w], n), absmax=tensors[f"{w}.absmax"],
                       block_size=block, quant_type=state["quant_type"])
        if f"{w}.nested_absmax" in tensors:
            qt.nested_absmax = tensors[f"{w}.nested_absmax"].float()
            qt.nested_code = tensors[f"{w}.nested_quant_map"].float()
            qt.offset = float(state["nested_offset"])
        return qt


def kept_module_names(weight_names: list[str]) -> list[str]:
    return [module_name(w) for w in weight_names]
