"""llama-quantize's per-tensor recipe: which block type each tensor of a Llama model gets in each file type.

A port of ``llama_tensor_get_type`` (src/llama-quant.cpp) for the file types we write, for Llama models
without experts, with or without an importance matrix. Pure policy: names and sizes in, block type out.
"""

from __future__ import annotations

from compress.ggml_types import K_MIXTURES, ggml_block_size

# llama-quantize's fallback when rows are not whole 256-element super-blocks (tensor_type_fallback)
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def llama_cpp_type(method: str, name: str, columns: int, n_layers: int, tied: bool, *,
                   has_imatrix: bool = False) -> tuple[str, str | None]:
    """The type ``llama-quantize`` gives the 2-D weight ``name`` (GGUF name, rows of ``columns``) for file type
    ``method``, in a Llama model of ``n_layers`` without experts; plus a note when it had to fall back for the
    row length. ``has_imatrix``: whether llama-quantize was given an importance matrix (``--imatrix``; its
    ``qs.has_imatrix`` holds for every tensor once one is loaded, whether or not it has an entry for this one).

    Where an importance matrix changes the recipe (src/llama-quant.cpp, ``llama_tensor_get_type_impl``):

    - ffn_down, file types Q4_0 and Q5_0, layers ``i < n_layers / 8``: Q4_1 / Q5_1 with an importance matrix
      ("guard against craziness in the first few ffn_down layers"; without one the type stays, so that a
      file made without an imatrix is what it always was). The only rule that applies to our file types.
    - attn_v for IQ3_XXS (IQ3_XXS instead of IQ3_S), ffn_down for IQ3_XXS (Q4_K/Q3_K only without) and for
      IQ4_NL / IQ4_XS (Q5_K in the first eighth only without): file types we do not write.
    - ``tensor_requires_imatrix``: IQ1/IQ2/IQ3_XXS tensors and Q2_K in Q2_K_S files need one (an error
      otherwise); none of ours.

    The row-length fallback comes after and applies to the guard's types too (Q4_1/Q5_1: F16 when rows are
    not whole 32-blocks).
    """
    base = K_MIXTURES.get(method, method)
    qtype = base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if columns % ggml_block_size(base):
            qtype = "q8_0"
        elif base != "q8_0":
            qtype = "q6_k"
    elif name.endswith(".attn_v.weight"):
        if method in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            qtype = "q6_k"
        elif method == "q4_k_s" and layer < 4:
            qtype = "q5_k"
    elif name.endswith(".ffn_down.weight"):
        if method in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            qtype = "q6_k"
        elif method == "q4_k_s" and layer < n_layers // 8:
            qtype = "q5_k"
        elif method in ("q4_0", "q5_0") and has_imatrix and layer < n_layers // 8:
            qtype = "q4_1" if method == "q4_0" else "q5_1"
    note = None
    if columns % ggml_block_size(qtype):
        chosen = K_FALLBACK.get(qtype, qtype)
        if columns % ggml_block_size(chosen):
            chosen = "f16"
        note = f"{name} ({columns} columns): {qtype.upper()} -> {chosen.upper()}"
        qtype = chosen
    return qtype, note
