"""Quantization methods: one registry entry per method, each a pure tensor -> tensor function.

``METHODS[name].quantize(W, config)`` returns a :class:`~compress.quant.base.QuantizedTensor`;
their names and summaries come from :mod:`compress.catalog`, which ``--help`` and ``compress methods`` read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compress.catalog import ALGORITHMS
from compress.catalog import METHODS as CATALOG_METHODS
from compress.ggml_types import GGML_METHODS
from compress.quant.base import QuantizedTensor
from compress.quant.ggml import GGMLConfig, GGMLTensor, quantize_ggml
from compress.quant.int4 import AffineInt4Tensor, Int4Config, Int4Tensor, quantize_int4
from compress.quant.nf4 import NF4Config, NF4Tensor, quantize_nf4
from compress.quant.optimize import optimize_int4, optimize_nf4


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


_IMPLEMENTATIONS = {  # the catalog's methods (names, summaries: compress.catalog) and their functions
    "nf4": (NF4Config, quantize_nf4, optimize_nf4),
    "fp4": (NF4Config, quantize_nf4, optimize_nf4),
    "int4": (Int4Config, quantize_int4, optimize_int4),
}
METHODS: dict[str, QuantMethod] = {}
for _info in CATALOG_METHODS.values():
    # llama.cpp's file types each follow llama-quantize's per-tensor recipe (output at 6 bits or more, fallbacks
    # for rows that are not whole blocks) and are byte-identical to it; their own quantize function searches when
    # given an importance
    _config_cls, _quantize, _optimize = _IMPLEMENTATIONS.get(_info.name, (GGMLConfig, quantize_ggml, None))
    METHODS[_info.name] = QuantMethod(name=_info.name, summary=_info.summary, config_cls=_config_cls,
                                      quantize=_quantize, default_format=_info.default_format,
                                      reference=_info.reference, optimize=_optimize)

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
