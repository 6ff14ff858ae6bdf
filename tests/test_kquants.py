"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K), Q5_0/Q5_1, and llama-quantize's per-tensor recipes.

- Every block type is byte-identical to llama.cpp's own ``quantize_row_<type>_ref``, called through ctypes
  in the ``libggml-base`` that llama-cpp-python ships, on weights chosen to reach every branch: row scales
  over five decades, heavy tails, all-positive rows, half-zero rows, all-zero super-blocks, small integers
  (ties), tiny values and bfloat16-rounded values. Q5_0/Q5_1 are also checked against ``gguf.quants``.
- Dequantization equals ``gguf.quants.dequantize`` of the same bytes, and the error is what the bits allow.
- Whole files: our export of a tiny Llama in every file type equals ``llama_model_quantize`` of our F32
  export, tensor by tensor (types and bytes), for rows that are whole super-blocks (hidden 256) and rows
  that are not (hidden 320: llama.cpp's fallbacks).
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama

from compress.quant.ggml import GGMLConfig, quantize_ggml

gguf = pytest.importorskip("gguf")

SIZES = {"q4_k": 144, "q5_k": 176, "q6_k": 210, "q5_0": 22, "q5_1": 24}
REF_NAMES = {"q4_k": "quantize_row_q4_K_ref", "q5_k": "quantize_row_q5_K_ref", "q6_k": "quantize_row_q6_K_ref",
             "q5_0": "quantize_row_q5_0_ref", "q5_1": "quantize_row_q5_1_ref"}
# relative Frobenius error on Gaussian weights, what each type's bits allow (measured on this matrix: 0.0714,
# 0.0362, 0.0177, 0.0427, 0.0379; Q4_0 gives 0.0859 and Q4_1 0.0783 at 4.5 and 5 bits)
ERROR_BOUND = {"q4_k": 0.075, "q5_k": 0.038, "q6_k": 0.019, "q5_0": 0.045, "q5_1": 0.040}
FILE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    randn = torch.randn(64, 1024, generator=g)
    mixed = torch.randn(32, 1024, generator=g)
    return {
        "randn": randn,
        "row_scales": randn * torch.logspace(-3, 2, 64).unsqueeze(1),
        "heavy_tails": torch.distributions.StudentT(2.0).sample((64, 1024)),
        "positive": torch.rand(16, 1024, generator=g) + 0.1,
        "half_zero": torch.where(torch.rand(32, 1024, generator=g) < 0.5, torch.zeros_like(mixed), mixed),
        "zero_superblocks": torch.cat([torch.zeros(4, 1024), randn[:4]]),
        "integers": torch.randint(-3, 4, (32, 1024), generator=g).float(),
        "tiny": randn[:8] * 1e-20,
        "bf16": randn[:32].bfloat16().float(),
    }


@pytest.fixture(scope="module")
def ggml_base() -> ctypes.CDLL:
    if os.environ.get("COMPRESS_REQUIRE_LLAMACPP"):
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                            "(bash scripts/setup_llamacpp.sh)")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    return ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))


def reference_bytes(lib: ctypes.CDLL, x: torch.Tensor, qtype: str) -> np.ndarray:
    flat = np.ascontiguousarray(x.float().numpy().reshape(-1))
    block = 256 if qtype.endswith("_k") else 32
    out = np.zeros(flat.size // block * SIZES[qtype], dtype=np.uint8)
    fn = getattr(lib, REF_NAMES[qtype])
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    fn(flat.ctypes.data, out.ctypes.data, flat.size)
    return out.reshape(-1, SIZES[qtype])


@pytest.mark.parametrize("qtype", list(SIZES))
def test_bytes_equal_llamacpp_reference(ggml_base: ctypes.CDLL, qtype: str) -> None:
    for name, x in cases().items():
        ours = quantize_ggml(x, GGMLConfig(qtype)).packed().numpy().reshape(-1, SIZES[qtype])
        theirs = reference_bytes(ggml_base, x, qtype)
        differ = int((ours != theirs).any(axis=1).sum())
        assert differ == 0, f"{qtype} {name}: {differ} of {len(ours)} blocks differ"


@pytest.mark.parametrize("qtype", ["q5_0", "q5_1"])
def test_q5_bytes_equal_gguf_package(qtype: str) -> None:
    for name, x in cases().items():
        ours = quantize_ggml(x, GGMLConfig(qtype)).packed().numpy()
        theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype.upper()])
        assert np.array_equal(ours, theirs), (qtype, name)


@pytest.mark.parametrize("qtype", list(SIZES))
def test_dequantize_equals_gguf_and_error_is_bounded(qtype: str) -> None:
    x = torch.randn(256, 2048, generator=torch.Generator().manual_seed(1))
    q = quantize_ggml(x, GGMLConfig(qtype))
    ours = q.dequantize(torch.float32)
    theirs = gguf.quants.dequantize(q.packed().numpy(), gguf.GGMLQuantizationType[qtype.upper()])
    assert np.array_equal(ours.numpy(), theirs.reshape(ours.shape))
    assert q.storage_bits() == 8 * SIZES[qtype] * x.numel() // (256 if qtype.endswith("_k") else 32)
    assert q.ggml_type_id == gguf.GGMLQuantizationType[qtype.upper()]
    rel = float((ours - x).norm() / x.norm())
    assert 0.5 * ERROR_BOUND[qtype] < rel < ERROR_BOUND[qtype], rel


def test_rows_must_be_whole_superblocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_ggml(torch.randn(4, 320), GGMLConfig("q4_k"))
    assert quantize_ggml(torch.randn(4, 320).bfloat16(), GGMLConfig("q5_0")).dequantize().dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("hidden", [256, 320])
def test_files_equal_llama_quantize(ggml_base: ctypes.CDLL, hidden: int, tmp_path: Path) -> None:
    """Every file type: same tensor types (llama-quantize's recipe and fallbacks) and the same bytes."""
    import llama_cpp

    from compress.formats.inputs import open_checkpoint
    from compress.pipeline.gguf import export_gguf

    folder = build_tiny_llama(tmp_path / "model", hidden=hidden, intermediate=2 * hidden, layers=8, vocab=512)
    f32 = tmp_path / "model.F32.gguf"
    seen: dict[str, Counter[str]] = {}
    with open_checkpoint(folder) as reader:
        export_gguf(reader, f32, "f32", tokenizer="none")
        for method in FILE_TYPES:
            ours_path, theirs_path = tmp_path / f"ours.{method}.gguf", tmp_path / f"llamacpp.{method}.gguf"
            export_gguf(reader, ours_path, method, tokenizer="none")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}")
            params.nthread = 2
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(),
                                                  ctypes.byref(params)) == 0
            ours_file, theirs_file = gguf.GGUFReader(ours_path), gguf.GGUFReader(theirs_path)
            ours = {t.name: t for t in ours_file.tensors}
            theirs = {t.name: t for t in theirs_file.tensors}
            assert sorted(ours) == sorted(theirs) and len(ours) == 75
            for name, t in ours.items():
                other = theirs[name]
                assert t.tensor_type == other.tensor_type, (method, name, t.tensor_type, other.tensor_type)
                assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(other.data).view(np.uint8)), \
                    (method, name)
            file_type = "general.file_type"
            assert ours_file.fields[file_type].contents() == theirs_file.fields[file_type].contents()
            seen[method] = Counter(t.tensor_type.name for t in ours.values())
            ours_path.unlink()
            theirs_path.unlink()
    # the recipes were exercised: 8 layers -> Q6_K for attn_v and ffn_down of layers 0, 3, 6, 7 in *_k_m, Q5_K
    # for the first four attn_v and the first ffn_down in q4_k_s, output at Q6_K (or Q8_0 when it falls back)
    if hidden == 256:
        assert seen["q4_k_m"] == {"Q4_K": 49, "Q6_K": 9, "F32": 17}
        assert seen["q4_k_s"] == {"Q4_K": 52, "Q5_K": 5, "Q6_K": 1, "F32": 17}
        assert seen["q4_0"] == {"Q4_0": 57, "Q6_K": 1, "F32": 17}
    else:  # 320 columns: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, as llama.cpp falls back
        assert seen["q4_k_m"] == {"Q5_0": 49, "Q8_0": 9, "F32": 17}
        assert seen["q5_k_s"] == {"Q5_1": 57, "Q8_0": 1, "F32": 17}


def test_llama_cpp_type_recipe() -> None:
    """The per-tensor rules of llama_tensor_get_type, without llama.cpp (the file test above checks them in it)."""
    from compress.quant.llama_cpp import llama_cpp_type

    def types(method: str, leaf: str, columns: int = 4096, n_layers: int = 32) -> list[str]:
        return [llama_cpp_type(method, f"blk.{i}.{leaf}", columns, n_layers, False)[0] for i in range(n_layers)]

    # use_more_bits for 32 layers: the first and last 4, and layers 6, 9, ..., 27 between
    more = {0, 1, 2, 3, 28, 29, 30, 31} | set(range(6, 28, 3))
    assert types("q4_k_m", "attn_v.weight") == ["q6_k" if i in more else "q4_k" for i in range(32)]
    assert types("q5_k_m", "ffn_down.weight") == ["q6_k" if i in more else "q5_k" for i in range(32)]
    assert types("q4_k_m", "attn_q.weight") == ["q4_k"] * 32
    assert types("q4_k_s", "attn_v.weight") == ["q5_k"] * 4 + ["q4_k"] * 28
    assert types("q4_k_s", "ffn_down.weight") == ["q5_k"] * 4 + ["q4_k"] * 28
    assert types("q4_0", "ffn_down.weight") == ["q4_0"] * 32  # no importance matrix: no Q4_1 guard
    # output (and a tied embedding) at Q6_K, or Q8_0 when its rows are not whole blocks of the file's type
    assert llama_cpp_type("q4_0", "output.weight", 4096, 32, False) == ("q6_k", None)
    assert llama_cpp_type("q4_k_m", "output.weight", 576, 32, False) == ("q8_0", None)
    assert llama_cpp_type("q4_0", "token_embd.weight", 4096, 32, True) == ("q6_k", None)
    assert llama_cpp_type("q4_0", "token_embd.weight", 4096, 32, False) == ("q4_0", None)
    assert llama_cpp_type("q8_0", "output.weight", 4096, 32, False) == ("q8_0", None)
    # fallbacks: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when not even 32-blocks
    assert llama_cpp_type("q4_k_m", "blk.5.attn_q.weight", 576, 32, False)[0] == "q5_0"
    assert llama_cpp_type("q5_k_s", "blk.5.attn_q.weight", 576, 32, False)[0] == "q5_1"
    qtype, note = llama_cpp_type("q6_k", "blk.5.attn_q.weight", 576, 32, False)
    assert qtype == "q8_0" and note is not None and "Q6_K -> Q8_0" in note
    assert llama_cpp_type("q4_k_m", "blk.5.attn_q.weight", 48, 32, False)[0] == "f16"
    assert llama_cpp_type("q4_0", "blk.5.attn_q.weight", 48, 32, False)[0] == "f16"
