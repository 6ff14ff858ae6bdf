"""Merging LoRA adapters into a base model, as pure math: each module's weight change as PEFT defines it
(:mod:`compress.merge.lora`), combining several adapters' dense deltas (:mod:`compress.merge.combine`) and
putting an update into quantized weights (:mod:`compress.merge.requant`). Reading adapter files is
:mod:`compress.formats.peft_adapter`; the stream over a checkpoint is :mod:`compress.pipeline.merge`."""

from compress.merge.combine import COMBINE_METHODS, CombineMethod, make_combine
from compress.merge.lora import (
    QALORA_POOLING,
    LoraModule,
    bias_delta,
    dora_merge,
    expand_group_delta,
    module_delta,
    qalora_group_delta,
)

__all__ = [
    "COMBINE_METHODS",
    "QALORA_POOLING",
    "CombineMethod",
    "LoraModule",
    "bias_delta",
    "dora_merge",
    "expand_group_delta",
    "make_combine",
    "module_delta",
    "qalora_group_delta",
]
