"""On-disk layouts: bit-exact packing examples, pack/unpack round trips, the streaming writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from compress.formats import FORMATS, detect_format
from compress.formats.bnb import pack_nibbles, unpack_nibbles
from compress.formats.checkpoint import read_safetensors_header
from compress.formats.gptq import pack_int4_rows, unpack_int4_rows
from compress.formats.inputs import open_checkpoint
from compress.formats.output import atomic_output_dir
from compress.formats.writer import ShardedWriter, TensorSpec, plan_shards
from compress.quant import make_config
from compress.quant.int4 import quantize_int4
from compress.quant.nf4 import quantize_nf4


def test_bnb_nibble_order_example() -> None:
    """formats.md: codes 15, 0, 3, 12 -> bytes 0xF0, 0x3C; an odd count is padded."""
    packed = pack_nibbles(torch.tensor([15, 0, 3, 12], dtype=torch.uint8), pad_code=7)
    assert packed.shape == (2, 1) and packed.flatten().tolist() == [0xF0, 0x3C]
    odd = pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8), pad_code=7)
    assert odd.flatten().tolist() == [0x12, 0x37]
    assert unpack_nibbles(odd, 3).tolist() == [1, 2, 3]


def test_gptq_word_layout_example() -> None:
    """Input row 8r + j sits in bits 4j..4j+3 of word r, least significant first."""
    q = torch.arange(16, dtype=torch.uint8).reshape(16, 1) % 16
    words = pack_int4_rows(q)
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert words[0, 0].item() & 0xFFFFFFFF == 0x76543210
    assert words[1, 0].item() & 0xFFFFFFFF == 0xFEDCBA98  # negative as int32: the sign bit is data
    assert torch.equal(unpack_int4_rows(words), q)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_pack_unpack_round_trip(sym: bool) -> None:
    W = torch.randn(64, 200)
    cfg = make_config("int4", group_size=64, symmetric=sym)
    qt = quantize_int4(W, cfg)
    fmt = FORMATS["gptq"]
    packed = fmt.pack("m.weight", qt)
    specs = fmt.packed_specs("m.weight", (64, 200), W.dtype, cfg)
    assert [(s.name, s.dtype, s.shape) for s in specs] == [(k, v.dtype, tuple(v.shape)) for k, v in packed.items()]
    qconfig = fmt.quantization_config(cfg, torch.float16, [], [])
    assert qconfig["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    if sym:  # v1 stores zero - 1 = 7 in every nibble
        assert bool((packed["m.qzeros"] == 0x77777777).all())
    back = fmt.unpack("m.weight", packed, qconfig, W.dtype)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.zeros, qt.zeros)
    assert torch.equal(back.scales, qt.scales)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert packed["m.g_idx"].tolist() == [i // 64 for i in range(200)]


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_pack_unpack_round_trip(dq: bool, quant_type: str) -> None:
    W = torch.randn(33, 65).to(torch.bfloat16)
    cfg = make_config(quant_type, block_size=64, double_quant=dq)
    qt = quantize_nf4(W, cfg)
    fmt = FORMATS["bnb"]
    packed = fmt.pack("m.weight", qt)
    specs = fmt.packed_specs("m.weight", (33, 65), W.dtype, cfg)
    assert [(s.name, s.dtype, s.shape) for s in specs] == [(k, v.dtype, tuple(v.shape)) for k, v in packed.items()]
    state = json.loads(bytes(packed[f"m.weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert state["shape"] == [33, 65] and state["dtype"] == "bfloat16" and state["blocksize"] == 64
    if dq:
        assert torch.tensor(state["nested_offset"], dtype=torch.float32).item() == qt.offset
    back = fmt.unpack("m.weight", packed, {}, W.dtype)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert detect_format(set(packed)) is fmt
    assert sorted(fmt.stored_keys("m.weight", set(packed) | {"m.bias", "m.weightx"})) == sorted(packed)


def test_streaming_writer_shards_and_reads_back(tmp_path) -> None:
    tensors = {f"t{i}": torch.randn(10, i + 1).to(dt) for i, dt in
               enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32])}
    tensors["codes"] = torch.arange(9, dtype=torch.uint8)
    tensors["words"] = torch.tensor([-1, 2**31 - 1], dtype=torch.int32)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_bytes=100)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    n_shards = len(plan_shards(specs, 100))
    assert n_shards > 1 and len(set(index["weight_map"].values())) == n_shards
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for k, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert torch.equal(f.get_tensor(k), tensors[k])
            assert f.metadata() == {"format": "pt"}
        header_len = struct.unpack("<Q", (tmp_path / shard).read_bytes()[:8])[0]
        assert header_len % 8 == 0
        read_safetensors_header(tmp_path / shard)  # our own strict checks accept it
    with open_checkpoint(tmp_path) as reader:
        assert [i.name for i in reader.infos()] == list(tensors)


def test_writer_refuses_unplanned_or_mismatched_tensors(tmp_path) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (2,))], 1000)
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.abort()


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError), atomic_output_dir(out, force=False) as tmp:
        (tmp / "partial").write_text("x")
        raise ValueError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "done").write_text("x")
    assert (out / "done").exists() and len(list(tmp_path.iterdir())) == 1
