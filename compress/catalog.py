"""What compress offers, as plain data that needs no torch: the names, one-line summaries and fixed value sets of
every registry (quantization methods and algorithms, export formats, merge methods and strategies, executors).

The command line builds its options, ``--help`` and ``compress methods`` from here, so that they answer without
loading the math (torch takes seconds to import). Each registry takes its entries' names and summaries from these
records (:data:`compress.quant.METHODS`, :data:`compress.formats.FORMATS`,
:data:`compress.merge.combine.COMBINE_METHODS`, ...), so every word is written once; tests/test_catalog.py checks
that the registries and this catalog list the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.ggml_types import FILE_TYPES, GGML_METHODS

# --- quantization ------------------------------------------------------------------------------------------------

GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # int4 input channels per group
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # nf4/fp4 elements per absmax block: what bitsandbytes accepts

# --algorithm: how the grid is chosen. rtn: round to nearest on the grid of each group's extremes (the reference
# libraries' bytes); optimize: each group's grid searched to minimise the weight error (compress.quant.optimize),
# never worse than rtn tensor by tensor.
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
class MethodInfo:
    """A quantization method as the command line shows it."""

    name: str
    summary: str
    default_format: str
    reference: str


QLORA_PAPER = "https://arxiv.org/abs/2305.14314"
METHODS: dict[str, MethodInfo] = {
    "nf4": MethodInfo("nf4", "4-bit NormalFloat, block-wise absmax (bitsandbytes / QLoRA); --block-size, "
                             "--double-quant", "bnb", QLORA_PAPER),
    "fp4": MethodInfo("fp4", "bitsandbytes' 4-bit float (e2m1), block-wise absmax; --block-size, --double-quant",
                      "bnb", QLORA_PAPER),
    "int4": MethodInfo("int4", "4-bit integers, group-wise round-to-nearest along the input (GPTQ layout); "
                               "--group-size, --sym/--asym", "gptq", "https://arxiv.org/abs/2210.17323"),
    # llama.cpp's file types, from their table; each GGUF file follows llama-quantize's per-tensor recipe
    **{t.name: MethodInfo(t.name, t.summary, "gguf", t.reference) for t in FILE_TYPES.values()},
}

# --- export formats ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatInfo:
    """An export format as the command line shows it: the methods it stores, and whether it is a checkpoint
    folder or a single file."""

    name: str
    summary: str
    methods: tuple[str, ...]
    container: str = "folder"


FORMATS: dict[str, FormatInfo] = {f.name: f for f in (
    FormatInfo("bnb", "transformers + bitsandbytes pre-quantized 4-bit (load_in_4bit checkpoints)", ("nf4", "fp4")),
    FormatInfo("gptq", "GPTQ int4 (qweight/qzeros/scales/g_idx; transformers+gptqmodel, vLLM, TGI, exllama)",
               ("int4",)),
    FormatInfo("native", "compress' INT4 with float offsets per group (exact target of QA-LoRA merges; read by "
                         "`compress dequantize`, no engine loads it directly)", ("int4",)),
    FormatInfo("gguf", "llama.cpp GGUF file (Llama architecture): llama-quantize's file types (Q4_0 ... Q8_0, "
                       "Q4_K_M ...), llama.cpp names and metadata, tokenizer carried over; llama.cpp, "
                       "llama-cpp-python, Ollama, transformers", GGML_METHODS, "file"),
    FormatInfo("compressed-tensors", "compressed-tensors pack-quantized W4A16 (weight_packed/weight_scale; vLLM, "
                                     "transformers)", ("int4",)),
)}

# --- merging -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CombineInfo:
    """A way to combine several adapters' deltas (``merge --combine``)."""

    name: str
    summary: str
    paper: str


PEFT_WEIGHTED = "https://github.com/huggingface/peft (add_weighted_adapter, combination_type='{}')"
COMBINE: dict[str, CombineInfo] = {c.name: c for c in (
    CombineInfo("sum", "exact weighted sum of the deltas", "https://arxiv.org/abs/2212.04089"),
    CombineInfo("cat", "concatenated ranks (r1 + r2 + ...): B'A' is exactly the weighted sum; dense result "
                       "identical to sum", PEFT_WEIGHTED.format("cat")),
    CombineInfo("ties", "trim to --density by magnitude, elect sign by total magnitude, disjoint mean",
                "https://arxiv.org/abs/2306.01708"),
    CombineInfo("dare", "drop elements at random (keep --density, seeded by --seed), rescale by 1/density, sum",
                "https://arxiv.org/abs/2311.03099"),
    CombineInfo("svd", "exact weighted sum, re-compressed to --rank by truncated SVD", PEFT_WEIGHTED.format("svd")),
)}

# merge --quantize: how the merged update reaches the quantized weights (compress.merge.requant)
STRATEGIES = ("fold", "fold-requant", "refit", "requantize", "float")
# QA-LoRA adapters: how the training code pooled lora_A's inputs (compress.merge.lora.QALORA_POOLING)
QALORA_POOLINGS = ("peft", "mean", "sum")

# --- running -----------------------------------------------------------------------------------------------------

EXECUTORS = ("local", "ray")
DEVICES = ("auto", "cpu", "cuda")
