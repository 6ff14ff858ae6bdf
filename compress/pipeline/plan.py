"""Plan: decide, before any data is read, what happens to each tensor and what gets written.

A plan lists every input tensor with its action (quantize or keep), the reason, and the exact
tensors that will be written for it. From it come the dry run, the projected size and the shard
layout of the streaming writer.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats.base import WeightFormat, module_name
from compress.formats.checkpoint import TensorInfo
from compress.formats.writer import TensorSpec
from compress.quant import METHODS

QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A tensor inside a repeated transformer block: '...layers.3.', '...h.3.', '...block.3.', ...
BLOCK_PATTERN = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")
EMBEDDING_PATTERN = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings"
                               r"|relative_attention_bias|shared\.weight)")
HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|output|classifier|score|qa_outputs)\.weight$")


def default_choice(info: TensorInfo) -> tuple[bool, str]:
    """Whether a tensor is quantized by default, and why (the report shows the reason)."""
    if not info.dtype.is_floating_point:
        return False, "not a float tensor"
    if len(info.shape) == 1:
        return False, "1-D (norm scale or bias)"
    if len(info.shape) != 2:
        return False, f"{len(info.shape)}-D tensor, not a Linear weight"
    if not info.name.endswith(".weight"):
        return False, "not a '.weight' tensor"
    if EMBEDDING_PATTERN.search(info.name):
        return False, "embedding"
    if HEAD_PATTERN.search(info.name):
        return False, "output head"
    if not BLOCK_PATTERN.search(info.name):
        return False, "outside the transformer blocks"
    return True, "Linear weight in a transformer block"


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one input tensor."""

    info: TensorInfo
    quantize: bool
    reason: str
    outputs: tuple[TensorSpec, ...]
    unsupported: bool = False  # selected, but the layout cannot hold it (kept in float)

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.outputs)


@dataclass
class Plan:
    """The whole job: every tensor in input order, plus the method, config and format."""

    method: str
    config: Any
    format: WeightFormat
    entries: list[TensorPlan] = field(default_factory=list)
    algorithm: str = "rtn"  # how quantized tensors choose their grid (compress.quant.ALGORITHMS)
    warnings: list[str] = field(default_factory=list)  # odd inputs the run goes on with (shown, and in the report)

    @property
    def quantized(self) -> list[TensorPlan]:
        return [e for e in self.entries if e.quantize]

    @property
    def kept(self) -> list[TensorPlan]:
        return [e for e in self.entries if not e.quantize]

    @property
    def input_bytes(self) -> int:
        return sum(e.info.nbytes for e in self.entries)

    @property
    def output_bytes(self) -> int:
        return sum(e.output_bytes for e in self.entries)

    def output_specs(self) -> list[TensorSpec]:
        return [s for e in self.entries for s in e.outputs]

    def kept_reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.kept:
            counts[e.reason] = counts.get(e.reason, 0) + 1
        return counts

    def kept_linear_modules(self) -> list[str]:
        """Modules of kept 2-D '.weight' tensors (loaders must not convert them)."""
        return [module_name(e.info.name) for e in self.kept
                if len(e.info.shape) == 2 and e.info.name.endswith(".weight")]


def compile_regex(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise OptionError(f"{option} {pattern!r} is not a valid regular expression ({e})",
                          fix="Quote the pattern and check its syntax.") from e


def check_algorithm(method: str, algorithm: str) -> None:
    """OptionError unless ``method`` offers ``algorithm``."""
    if algorithm not in METHODS[method].algorithms:
        raise OptionError(f"--algorithm {algorithm} is not available for --method {method}",
                          fix=f"{method} offers: {', '.join(METHODS[method].algorithms)}.")


def make_plan(infos: list[TensorInfo], method: str, config: Any, fmt: WeightFormat, *,
              include: str | None = None, exclude: str | None = None, algorithm: str = "rtn") -> Plan:
    """Decide each tensor's fate. ``include``/``exclude`` are regexes searched in tensor names:
    include adds 2-D float weights to the default selection, exclude removes tensors from it."""
    include_re = compile_regex(include, "--include")
    exclude_re = compile_regex(exclude, "--exclude")
    # The layout may tie the config to the model dtype (the most common dtype of its 2-D float weights).
    dtypes = Counter(i.dtype for i in infos if i.dtype in QUANTIZABLE_DTYPES and len(i.shape) == 2)
    config = fmt.adapt_config(config, dtypes.most_common(1)[0][0] if dtypes else torch.float32)
    check_algorithm(method, algorithm)
    plan = Plan(method=method, config=config, format=fmt, algorithm=algorithm)
    odd_dtype, empty, included = [], [], []
    for info in infos:
        chosen, reason = default_choice(info)
        if not info.dtype.is_floating_point and default_choice(replace(info, dtype=torch.float32))[0]:
            odd_dtype.append(info)  # where a Linear weight of the blocks is expected
            reason = f"not a float tensor ({str(info.dtype).removeprefix('torch.')})"
        if include_re is not None and include_re.search(info.name):
            included.append((info, reason))
        if (include_re is not None and include_re.search(info.name) and not chosen
                and info.dtype.is_floating_point and len(info.shape) == 2):
            chosen, reason = True, "selected by --include"
        if exclude_re is not None and exclude_re.search(info.name) and chosen:
            chosen, reason = False, "excluded by --exclude"
        if chosen and info.dtype not in QUANTIZABLE_DTYPES:
            raise InputError(f"tensor '{info.name}' is {str(info.dtype).removeprefix('torch.')}, which cannot be "
                             "quantized", where=str(info.file),
                             fix="Convert the checkpoint to float32, float16 or bfloat16, or --exclude the tensor.")
        if chosen and 0 in info.shape:
            chosen, reason = False, "empty (a dimension of size 0)"
            empty.append(info)
        unsupported = False
        if chosen:
            why_not = fmt.unsupported(info.shape, config)
            if why_not is not None:
                chosen, reason, unsupported = False, why_not, True
        if chosen:
            outputs = tuple(fmt.packed_specs(info.name, info.shape, info.dtype, config))
        else:
            outputs = (TensorSpec(info.name, info.dtype, info.shape),)
        plan.entries.append(TensorPlan(info=info, quantize=chosen, reason=reason, outputs=outputs,
                                       unsupported=unsupported))
    if odd_dtype:
        plan.warnings.append(f"{len(odd_dtype)} Linear weights of the blocks are not float and were kept as they are "
                             f"(first: '{odd_dtype[0].name}'"
                             f", {str(odd_dtype[0].dtype).removeprefix('torch.')})")
    if empty:
        plan.warnings.append(f"{len(empty)} weights have a dimension of size 0 and were kept as they are (first: "
                             f"'{empty[0].name}', shape {list(empty[0].shape)})")
    if include_re is not None:
        selected = {e.info.name for e in plan.quantized}
        if not included:
            plan.warnings.append(f"--include {include!r} matched no tensor")
        elif not any(i.name in selected for i, _ in included):
            reasons = sorted({r for _, r in included})
            plan.warnings.append(f"--include {include!r} matched {len(included)} tensors, none of which can be "
                                 f"quantized ({'; '.join(reasons[:3])})")
    names = [s.name for s in plan.output_specs()]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"two tensors would be written as '{dup}'",
                         fix="The checkpoint already contains quantized tensors; dequantize it first.")
    return plan
