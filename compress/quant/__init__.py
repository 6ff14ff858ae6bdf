"""Quantization methods: one registry entry per method, each a pure tensor -> tensor function.

``METHODS[name].quantize(W, config)`` returns a :class:`~compress.quant.base.QuantizedTensor`;
``--help`` and ``compress methods`` are generated from this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compress.quant.base import QuantizedTensor
from compress.quant.ggml import GGMLConfig, GGMLTensor, quantize_ggml
from compress.quant.ggml_types import FILE_TYPES, GGML_METHODS
from compress.quant.int4 import AffineInt4Tensor, Int4Config, Int4Tensor, quantize_int4
from compress.quant.nf4 import NF4Config, NF4Tensor, quantize_nf4
from compress.quant.optimize import optimize_int4, optimize_nf4

# --algorithm: how the grid is chosen. rtn: round to nearest on the grid of each group's extremes (the
# reference libraries' bytes); optimize: each group's grid searched to minimise the weight error
# (compress.quant.optimize), never worse than rtn tensor by tensor.
ALGORITHMS = {
    "rtn": "round to nearest on each group's min/max grid (today's bytes, identical to the reference libraries)",
    "optimize": "calibration-free: each group's scale/zero (INT4) or absmax (NF4/FP4) searched to minimise the "
                "weight error under the layout's constraints (GGUF: llama.cpp's block searches); never worse than "
                "rtn, tensor by tensor",
    "gptq": "GPTQ from calibration activations (--calibration): the optimised grid (GGUF: the block scales "
            "searched with the activations' importance) fixed first, then the codes rounded column by column with "
            "second-order error compensation, block by block through the model",
}


@dataclass(frozen=True)
class QuantMethod:
    """A registered quantization method."""

    name: str
    summary: str
    config_cls: type
    quantize: Callable[[torch.Tensor, Any], QuantizedTensor]
    default_format: str
    reference: str
    # optimize(W, config, importance=None, float_offset=False): the grid-searched variant (None: the method's own
    # quantize function searches when given an importance, as llama.cpp's types do)
    optimize: Callable[..., QuantizedTensor] | None = None
    algorithms: tuple[str, ...] = ("rtn", "optimize", "gptq")


METHODS: dict[str, QuantMethod] = {
    "nf4": QuantMethod(
        name="nf4",
        summary="4-bit NormalFloat, block-wise absmax (bitsandbytes / QLoRA); --block-size, --double-quant",
        config_cls=NF4Config,
        quantize=quantize_nf4,
        default_format="bnb",
        reference="https://arxiv.org/abs/2305.14314",
        optimize=optimize_nf4,
    ),
    "fp4": QuantMethod(
        name="fp4",
        summary="bitsandbytes' 4-bit float (e2m1), block-wise absmax; --block-size, --double-quant",
        config_cls=NF4Config,
        quantize=quantize_nf4,
        default_format="bnb",
        reference="https://arxiv.org/abs/2305.14314",
        optimize=optimize_nf4,
    ),
    "int4": QuantMethod(
        name="int4",
        summary="4-bit integers, group-wise round-to-nearest along the input (GPTQ layout); "
        "--group-size, --sym/--asym",
        config_cls=Int4Config,
        quantize=quantize_int4,
        default_format="gptq",
        reference="https://arxiv.org/abs/2210.17323",
        optimize=optimize_int4,
    ),
}
# llama.cpp's file types, from their table; each GGUF file follows llama-quantize's per-tensor recipe (output at
# 6 bits or more, fallbacks for rows that are not whole blocks) and is byte-identical to it.
for _ft in FILE_TYPES.values():
    METHODS[_ft.name] = QuantMethod(name=_ft.name, summary=_ft.summary, config_cls=GGMLConfig, quantize=quantize_ggml,
                                    default_format="gguf", reference=_ft.reference,
                                    algorithms=("rtn", "optimize", "gptq"))

QuantConfig = NF4Config | Int4Config | GGMLConfig


def make_config(method: str, *, block_size: int = 64, double_quant: bool = False, group_size: int = 128,
                symmetric: bool = False) -> QuantConfig:
    """Build the method's frozen config from CLI-style options (ValueError if invalid)."""
    if method in ("nf4", "fp4"):
        return NF4Config(block_size=block_size, double_quant=double_quant, quant_type=method)
    if method == "int4":
        return Int4Config(group_size=group_size, symmetric=symmetric)
    if method in GGML_METHODS:
        return GGMLConfig(method)  # fixed blocks: no options
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def describe_config(config: QuantConfig) -> str:
    """Short human description, e.g. 'nf4 b64 +dq', 'int4 g128 asym' or 'q4_0'."""
    if isinstance(config, NF4Config):
        return f"{config.quant_type} b{config.block_size}" + (" +dq" if config.double_quant else "")
    if isinstance(config, GGMLConfig):
        return config.qtype
    return f"int4 g{config.group_size} {'sym' if config.symmetric else 'asym'}"


def config_to_dict(config: QuantConfig) -> dict[str, Any]:
    """JSON-ready parameters of a method config (for reports and provenance)."""
    if isinstance(config, NF4Config):
        return {"method": config.quant_type, "block_size": config.block_size, "double_quant": config.double_quant}
    if isinstance(config, GGMLConfig):
        return {"method": config.qtype, "block_size": config.block_size}
    return {"method": "int4", "group_size": config.group_size, "symmetric": config.symmetric,
            "scale_dtype": str(config.scale_dtype).removeprefix("torch."),
            **({"desc_act": True} if config.desc_act else {})}


__all__ = [
    "ALGORITHMS",
    "GGML_METHODS",
    "METHODS",
    "AffineInt4Tensor",
    "GGMLConfig",
    "GGMLTensor",
    "Int4Config",
    "Int4Tensor",
    "NF4Config",
    "NF4Tensor",
    "QuantConfig",
    "QuantMethod",
    "QuantizedTensor",
    "config_to_dict",
    "describe_config",
    "make_config",
]
