"""Merging LoRA adapters into a base model: reading adapters as PEFT defines them
(:mod:`compress.merge.adapter`) and combining several adapters' dense deltas
(:mod:`compress.merge.combine`). Pure math apart from reading the adapter files; the stream over a
checkpoint lives in :mod:`compress.pipeline.merge`."""

from compress.merge.adapter import (
    QALORA_POOLING,
    AdapterConfig,
    LoraAdapter,
    LoraModule,
    bias_delta,
    dora_merge,
    expand_group_delta,
    module_delta,
    qalora_group_delta,
    read_adapter,
)
from compress.merge.combine import COMBINE_METHODS, CombineMethod, make_combine

__all__ = [
    "COMBINE_METHODS",
    "QALORA_POOLING",
    "AdapterConfig",
    "CombineMethod",
    "LoraAdapter",
    "LoraModule",
    "bias_delta",
    "dora_merge",
    "expand_group_delta",
    "make_combine",
    "module_delta",
    "qalora_group_delta",
    "read_adapter",
]
