"""GGUF export: llama.cpp block quantizers (Q4_0/Q4_1/Q8_0) and the llama.cpp GGUF writer.

- the quantizers give byte-for-byte what ``gguf.quants.quantize`` gives (llama.cpp's reference
  implementation in numpy), on many random blocks, float16/bfloat16 inputs and edge cases;
- a tiny Llama exported to every type reads back through ``gguf.GGUFReader`` (names, types, shapes,
  metadata, Q/K permutation in the stored bytes) and through our GGUF reader (exact for f32, equal to
  our quantizer's dequantized blocks otherwise);
- the real SmolLM2 Q4_1 GGUF exported to Q4_0 reads identically through our reader and transformers'
  GGUF loader, and carries the tokenizer (same ids from transformers' tokenizer as the source GGUF);
- a byte-level BPE tokenizer.json is converted exactly as llama.cpp's converter would (checked
  against the tokenizer metadata llama.cpp wrote into the SmolLM2 GGUF).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_llama

from compress.errors import InputError, OptionError, OutputError
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.gguf_names import gguf_name
from compress.formats.gguf_reader import GGUFReader
from compress.formats.gguf_tokenizer import _pre_from_structure, hf_bpe_vocab
from compress.formats.gguf_writer import LlamaParams
from compress.formats.inputs import open_checkpoint
from compress.pipeline.gguf import export_gguf, plan_tensors
from compress.quant.ggml import GGMLConfig, GGMLTensor, quantize_ggml, quantize_q4_0, quantize_q4_1, quantize_q8_0

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Q = gguf.GGMLQuantizationType
QTYPES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """gguf's quantized bytes and their dequantization (float32 input, as llama.cpp converts)."""
    with np.errstate(all="ignore"):
        q = gguf.quants.quantize(x.astype(np.float32), QTYPES[qtype])
        return q, gguf.quants.dequantize(q, QTYPES[qtype])


# --- (a) quantizers ---------------------------------------------------------------------------------


def edge_cases() -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    f32 = np.float32
    yield "zeros", np.zeros((4, 64), f32)
    yield "negative_zeros", -np.zeros((4, 64), f32)
    z = np.zeros((4, 64), f32)
    z[0, 3], z[1, 0], z[2, 40] = -0.0, -0.0, -0.0  # +0 and -0 in one block: first one wins
    yield "mixed_zeros", z
    yield "quarter_ties", rng.integers(-8, 9, (64, 128)).astype(f32) / 4
    yield "integers", rng.integers(-127, 128, (64, 128)).astype(f32)
    x = rng.standard_normal((16, 64)).astype(f32)
    x[:, 5], x[:, 9] = 3, -3  # |max| tie between +3 and -3: the first one's sign is the scale's
    x[::2, 5], x[::2, 9] = -3, 3
    yield "abs_ties", x
    k = rng.integers(-126, 126, (256, 32)).astype(f32)
    below_half = np.nextafter(f32(0.5), f32(0))
    off = rng.choice(np.array([0.5, -0.5, below_half, -below_half, 0.25, 0.0], f32), (256, 32))
    x = (k + off).astype(f32)
    x[:, 0] = 127.0  # Q8_0 scale 1: every .5 and just-below-.5 value exercises roundf
    yield "rounding_halves", x
    yield "constant", np.full((4, 64), 0.7, f32)
    yield "all_negative", -np.abs(rng.standard_normal((16, 64))).astype(f32)
    yield "large", (rng.standard_normal((8, 64)) * 1e37).astype(f32)
    yield "near_float32_max", np.array([[3e38, -3e38] * 16, [-3e38, 3e38] * 16], f32)
    yield "above_float16_range", (rng.standard_normal((8, 64)) * 1e6).astype(f32)
    yield "small", (rng.standard_normal((8, 64)) * 1e-30).astype(f32)
    yield "subnormal_scale", (rng.standard_normal((8, 64)) * 1e-39).astype(f32)  # 1/d overflows
    yield "subnormal_values", (rng.standard_normal((8, 64)) * 1e-44).astype(f32)
    yield "infinities", np.array([[np.inf] + [1.0] * 31, [-np.inf] + [0.0] * 31, [np.inf, -np.inf] + [2.0] * 30], f32)


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_random_blocks_bit_identical(qtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 16384 blocks
    x[::7] *= 50.0  # rows of different magnitudes
    ref, ref_deq = reference(x, qtype)
    q = quantize_ggml(torch.from_numpy(x), GGMLConfig(qtype))
    packed = q.packed()
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ref.shape
    assert np.array_equal(packed.numpy(), ref)
    assert q.to_bytes() == ref.tobytes()
    assert q.storage_bits() == 8 * ref.nbytes
    assert np.array_equal(q.dequantize().numpy(), ref_deq)
    assert q.dequantize().dtype == torch.float32 and q.shape == (512, 1024)


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_bit_identical(qtype: str, dtype: torch.dtype) -> None:
    """llama.cpp's converter widens float16/bfloat16 to float32 before quantizing; so do we."""
    w = (torch.randn(128, 512, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    ref, ref_deq = reference(w.float().numpy(), qtype)
    q = quantize_ggml(w, GGMLConfig(qtype))
    assert np.array_equal(q.packed().numpy(), ref)
    assert q.dequantize().dtype == dtype
    assert np.array_equal(q.dequantize(torch.float32).numpy(), ref_deq)


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("case", [name for name, _ in edge_cases()])
def test_edge_cases_bit_identical(qtype: str, case: str) -> None:
    x = dict(edge_cases())[case]
    ref, ref_deq = reference(x, qtype)
    q = quantize_ggml(torch.from_numpy(x.copy()), GGMLConfig(qtype))
    assert np.array_equal(q.packed().numpy(), ref), case
    assert np.array_equal(q.dequantize().numpy(), ref_deq, equal_nan=True), case


def test_block_layout_and_codes() -> None:
    """Q4_0 block bytes: fp16 d, then byte j = element j (low nibble) | element j + 16 (high nibble)."""
    x = torch.arange(32, dtype=torch.float32) - 16.0  # amax = -16 -> d = 2, codes (x / 2) + 8 rounded
    q = quantize_q4_0(x.reshape(1, 32))
    raw = q.to_bytes()
    assert len(raw) == 18 and np.frombuffer(raw[:2], np.float16)[0] == 2.0
    codes = q.codes.reshape(-1)
    assert all(raw[2 + j] == (int(codes[j]) | int(codes[j + 16]) << 4) for j in range(16))
    assert q.ggml_type_id == Q.Q4_0
    q1, q8 = quantize_q4_1(x.reshape(1, 32)), quantize_q8_0(x.reshape(1, 32))
    assert len(q1.to_bytes()) == 20 and np.frombuffer(q1.to_bytes()[2:4], np.float16)[0] == -16.0
    assert len(q8.to_bytes()) == 34 and q8.codes.dtype == torch.int8 and int(q8.codes.abs().max()) == 127
    # any number of leading dimensions; blocks run along the last one
    w = torch.randn(2, 3, 64)
    assert tuple(quantize_q4_1(w).packed().shape) == (2, 3, 40)
    assert np.array_equal(quantize_q4_1(w).packed().numpy(), reference(w.numpy(), "q4_1")[0])


def test_rows_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4_0(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(()))
    with pytest.raises(ValueError, match="q3_k"):  # a llama.cpp type we do not write
        GGMLConfig("q3_k")
    with pytest.raises(TypeError):
        quantize_q4_0(torch.zeros(4, 32, dtype=torch.int32))


# --- (b) tiny Llama ---------------------------------------------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_gguf"), hidden=HIDDEN, intermediate=INTER,
                            layers=LAYERS, vocab=VOCAB)


@pytest.fixture(scope="module")
def tiny_exports(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("tiny_gguf")
    exports = {}
    with open_checkpoint(tiny) as reader:
        for method in ("f32", "f16", "q8_0", "q4_0", "q4_1"):
            path = out / f"tiny-{method}.gguf"
            exports[method] = (path, export_gguf(reader, path, method, tokenizer="none"))
    return exports


def expected_type(name: str, method: str) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    if name == "output.weight" and method in ("q4_0", "q4_1"):
        return "Q8_0"  # the output projection stays at 8 bits with 4-bit methods
    return method.upper()


@pytest.mark.parametrize("method", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_tiny_gguf_structure(tiny: Path, tiny_exports: dict[str, tuple[Path, dict[str, Any]]], method: str) -> None:
    path, report = tiny_exports[method]
    g = gguf.GGUFReader(path)
    tensors = {t.name: t for t in g.tensors}
    with open_checkpoint(tiny) as src:
        hf_shapes = {i.name: i.shape for i in src.infos()}
    expected_names = {gguf_name(n) for n in hf_shapes}
    assert set(tensors) == expected_names and "output.weight" in tensors  # untied
    assert list(tensors)[:2] == [gguf_name(n) for n in list(hf_shapes)[:2]]  # reader order kept
    for hf, shape in hf_shapes.items():
        t = tensors[gguf_name(hf)]
        assert t.tensor_type.name == expected_type(t.name, method), t.name
        assert tuple(int(d) for d in t.shape) == tuple(reversed(shape)), t.name  # GGUF: innermost first

    def field(key: str) -> Any:
        return g.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}[method]
    assert field("general.quantization_version") == 2
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (
        LAYERS, HIDDEN, INTER)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (HEADS, KV_HEADS)
    assert (field("llama.context_length"), field("llama.vocab_size")) == (128, VOCAB)
    assert field("llama.rope.dimension_count") == HIDDEN // HEADS == field("llama.attention.key_length")
    assert field("llama.rope.freq_base") == 10000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == np.float32(1e-6)
    assert not any(k.startswith("tokenizer.") for k in g.fields)  # tokenizer="none"

    assert report["bytes"] == path.stat().st_size
    assert sum(v["tensors"] for v in report["by_type"].values()) == len(tensors)
    for entry in report["tensors"]:
        t = tensors[entry["name"]]
        assert entry["type"] == t.tensor_type.name and entry["bytes"] == t.n_bytes
        assert entry["shape"] == [int(d) for d in t.shape]


@pytest.mark.parametrize("method", ["f32", "q8_0", "q4_0"])
def test_tiny_stored_bytes_are_permuted_quantized(tiny: Path, tiny_exports: dict[str, tuple[Path, dict[str, Any]]],
                                                 method: str) -> None:
    """The file holds llama.cpp's layout: Q/K rows permuted (llama.cpp's own formula), then our blocks."""
    path, _ = tiny_exports[method]
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with open_checkpoint(tiny) as src:
        for hf in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                   "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
            w = src.get(hf).numpy()
            if "q_proj" in hf:
                w = llama_cpp_permute(w, HEADS)
            elif "k_proj" in hf:
                w = llama_cpp_permute(w, KV_HEADS)
            stored = np.asarray(tensors[gguf_name(hf)].data)
            if method == "f32":
                assert np.array_equal(stored.reshape(w.shape), w), hf
            else:
                ref, _ = reference(w, method)  # gguf's own quantizer on llama.cpp's permuted rows
                assert np.array_equal(stored.reshape(ref.shape), ref), hf


@pytest.mark.parametrize("method", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_tiny_round_trip_through_our_reader(tiny: Path, tiny_exports: dict[str, tuple[Path, dict[str, Any]]],
                                            method: str) -> None:
    path, _ = tiny_exports[method]
    with open_checkpoint(tiny) as src, open_checkpoint(path) as back:
        assert isinstance(back, GGUFReader)
        assert [i.name for i in back.infos()] == [i.name for i in src.infos()]
        for info in src.infos():
            w, got = src.get(info.name), back.get(info.name)
            kind = expected_type(gguf_name(info.name) or "", method)
            if kind == "F32":
                expected = w  # exact, through the permutation and back
            elif kind == "F16":
                expected = w.half().float()
            else:
                expected = quantize_ggml(w, GGMLConfig(kind.lower())).dequantize(torch.float32)
            assert got.dtype == torch.float32 and torch.equal(got, expected), info.name
        config = back.config
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim"):
            assert config[key] == src.config[key], key
        assert config["tie_word_embeddings"] is False
        assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == pytest.approx(1e-6)


def test_tiny_quantized_logits_close(tiny: Path, tiny_exports: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """The exported Q8_0 model, read back, still computes what the original computes."""
    transformers = pytest.importorskip("transformers")
    path, _ = tiny_exports["q8_0"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    with open_checkpoint(path) as back:
        quant = transformers.LlamaForCausalLM(transformers.LlamaConfig(**back.config)).eval()
        quant.load_state_dict({i.name: back.get(i.name) for i in back.infos()}, strict=True)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, quant(ids).logits
    assert torch.allclose(a, b, atol=0.02 * float(a.abs().max()))


def test_tiny_tokenizer_required_unless_none(tiny: Path, tmp_path: Path) -> None:
    with open_checkpoint(tiny) as reader, pytest.raises(InputError, match="--tokenizer none"):
        export_gguf(reader, tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_option_of_the_command_line(model_256: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint folder without tokenizer files: the error names the options (never a Python argument);
    --tokenizer PATH carries the tokenizer of another folder, exactly as from the model's own files;
    --tokenizer none writes none, with a line saying llama.cpp cannot run the file."""
    import shutil

    from conftest import run_cli

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_256 / name, bare / name)
    gguf_args = ("--method", "q8_0", "--format", "gguf", "-q")
    r = run_cli(capsys, "quantize", bare, "-o", tmp_path / "x.gguf", *gguf_args)
    assert r.rc == 2 and "--tokenizer PATH" in r.err and "--tokenizer none" in r.err and "tokenizer=" not in r.err
    assert not (tmp_path / "x.gguf").exists()
    own, other = tmp_path / "own.gguf", tmp_path / "other.gguf"
    assert run_cli(capsys, "quantize", model_256, "-o", own, *gguf_args).rc == 0
    for source in (model_256, model_256 / "tokenizer.json"):  # a folder, or the file itself
        r = run_cli(capsys, "quantize", bare, "-o", other, *gguf_args, "--tokenizer", source, "--force")
        assert r.rc == 0, r.err
        a, b = gguf.GGUFReader(own), gguf.GGUFReader(other)
        keys = [k for k in a.fields if k.startswith("tokenizer.")]
        assert len(keys) > 5 and keys == [k for k in b.fields if k.startswith("tokenizer.")]
        for k in keys:
            assert a.fields[k].contents() == b.fields[k].contents(), k
    none = tmp_path / "none.gguf"
    r = run_cli(capsys, "quantize", bare, "-o", none, "--method", "q8_0", "--format", "gguf", "--tokenizer", "none")
    assert r.rc == 0 and "llama.cpp cannot run this file" in " ".join(r.out.split()), r.out
    assert not any(k.startswith("tokenizer.") for k in gguf.GGUFReader(none).fields)
    r = run_cli(capsys, "quantize", bare, "-o", tmp_path / "y.gguf", *gguf_args, "--tokenizer", tmp_path / "nowhere")
    assert r.rc == 2 and "no such file or folder" in r.err
    r = run_cli(capsys, "quantize", bare, "-o", tmp_path / "f", "--tokenizer", "none")
    assert r.rc == 2 and "--tokenizer applies to --format gguf" in r.err


def test_options_and_output_errors(tiny: Path, tiny_exports: dict[str, tuple[Path, dict[str, Any]]],
                                   tmp_path: Path) -> None:
    existing, _ = tiny_exports["f32"]
    with open_checkpoint(tiny) as reader:
        with pytest.raises(OptionError, match="q4_0"):
            export_gguf(reader, tmp_path / "x.gguf", "q5_k")
        with pytest.raises(OptionError):
            export_gguf(reader, tmp_path / "x.gguf", "q4_0", tokenizer="sentencepiece")
        with pytest.raises(OutputError, match="already exists"):
            export_gguf(reader, existing, "f32", tokenizer="none")
        with pytest.raises(OutputError, match="overlaps"):
            export_gguf(reader, tiny / "model.gguf", "f32", tokenizer="none")
        out = tmp_path / "replaced.gguf"
        out.write_bytes(b"old")
        export_gguf(reader, out, "q8_0", tokenizer="none", force=True)
        assert out.read_bytes()[:4] == b"GGUF"


class FailingReader(CheckpointReader):
    """Delegates to a real reader; ``get`` fails on the n-th call (simulates a crash mid-export)."""

    def __init__(self, inner: CheckpointReader, fail_at: int, error: Exception) -> None:
        self.inner, self.path, self.config = inner, inner.path, inner.config
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def infos(self) -> list[TensorInfo]:
        return self.inner.infos()

    def get(self, name: str) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.inner.get(name)


def test_failure_leaves_nothing(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    with open_checkpoint(tiny) as inner:
        with pytest.raises(RuntimeError, match="disk on fire"):
            export_gguf(FailingReader(inner, 5, RuntimeError("disk on fire")), out, "q4_0", tokenizer="none")
        assert list(tmp_path.iterdir()) == []

        class NaNReader(FailingReader):
            def get(self, name: str) -> torch.Tensor:
                w = self.inner.get(name)
                return w.fill_(float("nan")) if name.endswith("up_proj.weight") else w

        with pytest.raises(InputError, match="NaN or inf"):
            export_gguf(NaNReader(inner, 0, RuntimeError()), out, "q4_0", tokenizer="none")
        assert list(tmp_path.iterdir()) == []


def test_plan_types_fallback_and_tied() -> None:
    def info(name: str, *shape: int) -> TensorInfo:
        return TensorInfo(name, shape, torch.bfloat16, Path("x"))

    hidden, inter = 48, 96  # rows of 48 are not whole 32-blocks
    infos = [info("model.embed_tokens.weight", 64, hidden), info("model.norm.weight", hidden)]
    infos += [info(f"model.layers.0.{leaf}", *shape) for leaf, shape in {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden // 2, hidden),
        "self_attn.v_proj.weight": (hidden // 2, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter)}.items()]
    infos.append(info("model.layers.0.self_attn.rotary_emb.inv_freq", 6))
    p = LlamaParams(hidden=hidden, layers=1, heads=4, kv_heads=2, head_dim=12, intermediate=inter, vocab=64,
                    rms_eps=1e-5, rope_theta=1e4, context=None, tied=True, rope_scaling=None)
    plan, notes = plan_tensors(infos, p, "q4_0", None, "x")
    types = {t.name: t.qtype for t in plan}
    assert "blk.0.self_attn.rotary_emb.inv_freq" not in types and "output.weight" not in types
    assert types["blk.0.ffn_down.weight"] == "q4_0"  # rows of 96
    assert types["blk.0.attn_q.weight"] == "f16" and types["token_embd.weight"] == "f16"
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "f32"
    assert any("blk.0.attn_q.weight" in n and "F16" in n for n in notes)
    heads = {t.name: t.permute_heads for t in plan}
    assert heads["blk.0.attn_q.weight"] == 4 and heads["blk.0.attn_k.weight"] == 2
    assert heads["blk.0.attn_v.weight"] is None
    # tied 4-bit: the embedding doubles as the output layer, so Q8_0 (rows of 64 here)
    plan, _ = plan_tensors([info("model.embed_tokens.weight", 64, 64), *infos[1:]], p, "q4_1", None, "x")
    assert {t.name: t.qtype for t in plan}["token_embd.weight"] == "q8_0"
    plan, _ = plan_tensors([info("model.embed_tokens.weight", 64, 64), *infos[1:]], p, "q4_1", "f16", "x")
    assert {t.name: t.qtype for t in plan}["token_embd.weight"] == "f16"
    with pytest.raises(InputError, match=r"blk\.0\.ffn_up\.weight"):
        plan_tensors([i for i in infos if "up_proj" not in i.name], p, "q4_0", None, "x")


# --- (c) the real SmolLM2 GGUF ------------------------------------------------------------------------

# What transformers' tokenizer built from the source GGUF gives (AutoTokenizer.from_pretrained(folder,
# gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")); the exported file must give the same.
SOURCE_IDS = {
    "The quick brown fox jumps over the lazy dog.": [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
    "  héllo\n\twörld 12345 <|im_start|>user": [216, 294, 2756, 31394, 198, 197, 103, 29989, 400, 216, 33, 34, 35,
                                                36, 37, 216, 1, 4093],
    "Hello world": [19556, 905],
}
SOURCE_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\nHi!<|im_end|>\n")


def gguf_package_reader(reader: GGUFReader) -> Any:
    """The ``gguf.GGUFReader`` our reader already parsed (parsing SmolLM2 again costs seconds)."""
    return reader.gguf


@pytest.fixture(scope="module")
def smol_src(smollm2_gguf: Path) -> Iterator[GGUFReader]:
    with GGUFReader(smollm2_gguf) as reader:
        yield reader


@pytest.fixture(scope="module")
def smol_q4_0(smol_src: GGUFReader, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("smol_q4_0") / "SmolLM2-135M-Instruct.Q4_0.gguf"
    return out, export_gguf(smol_src, out, "q4_0")


@pytest.fixture(scope="module")
def smol_back(smol_q4_0: tuple[Path, dict[str, Any]]) -> Iterator[GGUFReader]:
    with GGUFReader(smol_q4_0[0]) as reader:
        yield reader


@pytest.mark.slow
def test_smollm_export_matches_transformers(smol_src: GGUFReader, smol_q4_0: tuple[Path, dict[str, Any]],
                                            smol_back: GGUFReader, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers rebuilds gguf's (pure) tensor name map for each of the model's ~400 modules: 12 s here
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))

    path, report = smol_q4_0
    assert report["by_type"]["Q4_0"]["tensors"] == 210 and report["by_type"]["F32"]["tensors"] == 61
    assert report["by_type"]["Q8_0"]["tensors"] == 1  # token_embd: tied to the output
    assert report["bytes"] < 0.95 * smol_src.path.stat().st_size  # Q4_0 is smaller than the Q4_1 source

    # one parse: the meta model from our config (test_gguf_reader checks it equals transformers'),
    # and transformers' own config from the same call
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**smol_back.config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    theirs = parsed["tensors"]
    for key, value in parsed["config"].items():
        if key in smol_back.config:
            assert smol_back.config[key] == value, key
    assert smol_back.config == {**smol_src.config}  # nothing in the architecture changed
    infos = smol_back.infos()
    assert sorted(i.name for i in infos) == sorted(theirs) and len(infos) == 272
    for info in infos:
        ours = smol_back.get(info.name)
        assert ours.dtype == theirs[info.name].dtype == torch.float32, info.name
        assert torch.equal(ours, theirs.pop(info.name)), info.name


@pytest.mark.slow
def test_smollm_export_is_our_quantizer(smol_src: GGUFReader, smol_q4_0: tuple[Path, dict[str, Any]],
                                        smol_back: GGUFReader) -> None:
    """Stored blocks are our quantizer applied to llama.cpp-permuted source rows; reading undoes it."""
    stored = {t.name: t for t in gguf_package_reader(smol_back).tensors}
    heads, kv_heads = smol_src.config["num_attention_heads"], smol_src.config["num_key_value_heads"]
    for hf, qtype, n_head in (("model.layers.0.self_attn.q_proj.weight", "q4_0", heads),
                              ("model.layers.7.self_attn.k_proj.weight", "q4_0", kv_heads),
                              ("model.layers.29.mlp.down_proj.weight", "q4_0", None),
                              ("model.embed_tokens.weight", "q8_0", None)):
        w = smol_src.get(hf)
        q: GGMLTensor = quantize_ggml(torch.from_numpy(llama_cpp_permute(w.numpy(), n_head)) if n_head else w,
                                      GGMLConfig(qtype))
        t = stored[gguf_name(hf)]
        assert t.tensor_type == QTYPES[qtype]
        assert np.array_equal(np.asarray(t.data).reshape(-1), q.packed().numpy().reshape(-1)), hf
        back = smol_back.get(hf)
        expected = quantize_ggml(w, GGMLConfig(qtype)).dequantize(torch.float32)  # rows move whole
        assert torch.equal(back, expected), hf
        assert (back - w).abs().max() < 0.25 * w.abs().max()  # and it is close to the source


@pytest.mark.slow
def test_smollm_tokenizer_carried(smol_src: GGUFReader, smol_q4_0: tuple[Path, dict[str, Any]],
                                  smol_back: GGUFReader) -> None:
    path, report = smol_q4_0
    src_fields, out_fields = gguf_package_reader(smol_src).fields, gguf_package_reader(smol_back).fields
    keys = [k for k in src_fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.tokens" in keys and "tokenizer.chat_template" in keys
    assert report["tokenizer"] == {"source": "gguf", "keys": keys}
    for key in keys:
        a, b = src_fields[key], out_fields[key]
        assert a.types == b.types and a.contents() == b.contents(), key
    assert smol_back.metadata["general.name"] == smol_src.metadata["general.name"]
    # the source's model card travels too (license, base name, size label, languages...), types kept;
    # keys the writer owns (file type, quantization version) are ours, not copied
    card = [k for k in src_fields if k.startswith("general.") and k not in (
        "general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version")]
    assert {"general.license", "general.basename", "general.size_label"} <= set(card)
    for key in card:
        a, b = src_fields[key], out_fields[key]
        assert a.types == b.types and a.contents() == b.contents(), key
    assert out_fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0, not the source's Q4_1 (3)
    assert src_fields["general.file_type"].contents() == 3

    # Every tokenizer key is identical, so transformers builds the source's tokenizer from the export
    # (building it from the source too would double the test's time; SOURCE_IDS hold its answers).
    transformers = pytest.importorskip("transformers")
    ours = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text, ids in SOURCE_IDS.items():
        assert ours(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(messages, tokenize=False) == SOURCE_CHAT
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


# --- (d) tokenizer.json -> GGUF vocabulary ---------------------------------------------------------------


def smollm_tokenizer_files(fields: Any) -> dict[str, str]:
    """SmolLM2's Hugging Face tokenizer files, rebuilt from the GGUF llama.cpp wrote from them."""
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [m.split(" ") for m in fields["tokenizer.ggml.merges"].contents()]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    config = {"add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "chat_template": fields["tokenizer.chat_template"].contents()}
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False)}


@pytest.mark.slow
def test_hf_tokenizer_converted_like_llama_cpp(smol_src: GGUFReader, tmp_path: Path) -> None:
    """A Hugging Face folder with SmolLM2's tokenizer.json: every tokenizer key llama.cpp wrote comes out equal."""
    src_fields = gguf_package_reader(smol_src).fields
    folder = build_tiny_llama(tmp_path / "hf", hidden=64, intermediate=64, layers=1, vocab=49152)
    for name, text in smollm_tokenizer_files(src_fields).items():
        (folder / name).write_text(text, encoding="utf-8")
    out = tmp_path / "tiny-smol-vocab.gguf"
    with open_checkpoint(folder) as reader:
        report = export_gguf(reader, out, "q8_0")
    assert report["tokenizer"]["pre"] == "smollm" and report["tokenizer"]["pre_identified_by"] == "hash"
    out_fields = gguf.GGUFReader(out).fields
    keys = [k for k in src_fields if k.startswith("tokenizer.")]
    assert sorted(keys) == sorted(k for k in out_fields if k.startswith("tokenizer."))
    for key in keys:
        a, b = src_fields[key], out_fields[key]
        assert a.types == b.types and a.contents() == b.contents(), key


def test_bpe_vocab_types_padding_and_pre() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    del tokenizers
    vocab = {c: i for i, c in enumerate("abcdĠ")} | {"ab": 5, "Ġa": 6}
    tok = {
        "added_tokens": [
            {"id": 7, "content": "<|end|>", "special": True, "normalized": False},
            {"id": 8, "content": "<|tool|>", "special": False, "normalized": False},  # looks special
            {"id": 9, "content": "hello\u2581world", "special": False, "normalized": True},
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], ["Ġ", "a"]], "byte_fallback": False},
    }
    v = hf_bpe_vocab(tok, 12, "x")
    assert v.tokens[:7] == [*list("abcdĠ"), "ab", "Ġa"]
    assert v.tokens[7:] == ["<|end|>", "<|tool|>", "hello world", "[PAD10]", "[PAD11]"]
    assert v.token_types == [1] * 7 + [3, 3, 4, 5, 5]
    assert (v.pre, v.pre_source) == ("gpt-2", "structure")  # an unknown vocabulary: identified by structure
    with pytest.raises(InputError, match="vocabulary is 8"):
        hf_bpe_vocab(tok, 8, "x")
    with pytest.raises(InputError, match="byte_fallback"):
        hf_bpe_vocab({**tok, "model": {**tok["model"], "byte_fallback": True}}, 12, "x")
    with pytest.raises(InputError, match=r"not one llama\.cpp"):
        hf_bpe_vocab({**tok, "pre_tokenizer": {"type": "Whitespace"}}, 12, "x")


def test_pre_tokenizer_structures() -> None:
    from compress.formats.gguf_tokenizer import _LLAMA3_PATTERN

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    llama3 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}}
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}}
    assert _pre_from_structure(llama3) == "llama-bpe"
    assert _pre_from_structure(smollm) == "smollm"
    assert _pre_from_structure({"pre_tokenizer": byte_level}) == "gpt-2"
    assert _pre_from_structure({"pre_tokenizer": {**byte_level, "use_regex": False}}) is None
    assert _pre_from_structure({}) is None


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path: Path) -> None:
    """A Llama 3.1-style config gets llama.cpp's rope_freqs tensor; our reader drops it with a note."""
    folder = build_tiny_llama(tmp_path / "hf", hidden=64, intermediate=64, layers=1, vocab=64)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "rope.gguf"
    with open_checkpoint(folder) as reader:
        export_gguf(reader, out, "f32", tokenizer="none")
    g = gguf.GGUFReader(out)
    freqs = next(t for t in g.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(freqs.data)
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0  # head_dim 16 -> 8 factors
    assert g.fields["llama.rope.freq_base"].contents() == 500000.0
    with open_checkpoint(out) as back:
        assert any("RoPE scaling" in n for n in back.notes)
    config["rope_parameters"]["rope_type"] = "yarn"
    (folder / "config.json").write_text(json.dumps(config))
    with open_checkpoint(folder) as reader, pytest.raises(InputError, match="yarn"):
        export_gguf(reader, tmp_path / "yarn.gguf", "f32", tokenizer="none")
