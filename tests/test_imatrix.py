"""Importance-matrix ("imatrix") quantization and files, against llama.cpp itself.

- Quantizers: with an importance vector, every type we write (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
  gives the bytes of ``ggml_quantize_chunk(type, ..., imatrix)`` called through ctypes in the
  ``libggml-base`` that llama-cpp-python ships, on the weights of test_kquants.py (scales over five decades,
  heavy tails, all-positive rows, half-zero rows, all-zero super-blocks, small integers (ties), tiny values,
  bfloat16-rounded values) plus signed zeros and rows that are not whole super-blocks, each with importance
  vectors that are random positive, a third zeros, all ones, and spread over twelve decades. The importance
  changes the bytes (except Q8_0, which llama.cpp quantizes without it) and bad importance vectors are refused.
- Files: a legacy ``.dat`` built byte by byte as llama-imatrix's writer does is read back and written again
  to the same bytes; a GGUF imatrix written by us equals, byte for byte, the one llama.cpp's own gguf writer
  makes from the same entries; GGUF round trip; .dat <-> GGUF conversions keep every importance vector bit
  for bit; truncated, foreign and incomplete files raise InputError with a one-line message.
- Recipe: ``llama_cpp_type(..., has_imatrix=True)`` moves the first eighth of ffn_down to Q4_1 / Q5_1 in
  Q4_0 / Q5_0 files, and nothing else for our file types.
- Whole files (slow): llama-quantize (``llama_model_quantize`` with an importance matrix) of a tiny Llama's
  F32 GGUF equals, tensor by tensor (type and bytes), our recipe with ``has_imatrix=True`` and our quantizer
  fed the importance vectors read back from the imatrix file we wrote.

Time per 4096x4096 float32 matrix with a random positive importance vector, measured once with one torch
thread on a busy 2-core machine (indicative), ours vs ``ggml_quantize_chunk``: Q4_0 1.3 s vs 0.5 s, Q4_1
3.0 s vs 1.9 s, Q5_0 1.2 s vs 0.4 s, Q5_1 3.0 s vs 1.9 s, Q8_0 0.04 s vs 0.06 s (importance ignored), Q4_K
3.1 s vs 2.3 s, Q5_K 2.9 s vs 2.2 s, Q6_K 1.0 s vs 0.5 s.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama

from compress.errors import InputError
from compress.formats.imatrix import ImatrixEntry, ImportanceMatrix, read_imatrix, write_imatrix
from compress.ggml_types import BLOCK_TYPES
from compress.quant.ggml import GGMLConfig, quantize_ggml
from compress.quant.llama_cpp import llama_cpp_type

gguf = pytest.importorskip("gguf")

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")


def cases() -> dict[str, torch.Tensor]:
    """test_kquants.py's weights, plus signed zeros and rows of 320 (not whole super-blocks: 32-block types)."""
    g = torch.Generator().manual_seed(0)
    randn = torch.randn(64, 1024, generator=g)
    mixed = torch.randn(32, 1024, generator=g)
    signs = torch.where(torch.rand(16, 1024, generator=g) < 0.5, -1.0, 1.0)
    signed_zeros = torch.where(torch.rand(16, 1024, generator=g) < 0.4, 0.0 * signs, torch.rand(16, 1024, generator=g))
    signed_zeros[0], signed_zeros[1], signed_zeros[2, :512] = -0.0, 0.0, -0.0
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
        "signed_zeros": signed_zeros,
        "rows_320": torch.randn(24, 320, generator=g),
    }


def importances(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    positive = torch.rand(n, generator=g) + 0.01
    return {
        "random": positive,
        "zeros": torch.where(torch.rand(n, generator=g) < 0.33, torch.zeros(n), positive),
        "ones": torch.ones(n),
        "decades": torch.logspace(-6, 6, n)[torch.randperm(n, generator=g)],
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


def quantize_chunk(lib: ctypes.CDLL, x: torch.Tensor, qtype: str, importance: torch.Tensor | None) -> np.ndarray:
    """``ggml_quantize_chunk(type, x, dst, 0, rows, columns, importance)``: uint8 [n_blocks, type_size]."""
    t = BLOCK_TYPES[qtype]
    src = np.ascontiguousarray(x.float().numpy().reshape(-1, x.shape[-1]))
    rows, columns = src.shape
    out = np.zeros(rows * columns // t.block_size * t.type_size, dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance.float().numpy())
    lib.ggml_quantize_init.argtypes, lib.ggml_quantize_init.restype = [ctypes.c_int], None
    lib.ggml_quantize_init(t.type_id)
    fn = lib.ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    written = fn(t.type_id, src.ctypes.data, out.ctypes.data, 0, rows, columns,
                 None if imp is None else imp.ctypes.data)
    assert written == out.size
    return out.reshape(-1, t.type_size)


def ours(x: torch.Tensor, qtype: str, importance: torch.Tensor | None) -> np.ndarray:
    return quantize_ggml(x, GGMLConfig(qtype), importance=importance).packed().numpy().reshape(
        -1, BLOCK_TYPES[qtype].type_size)


# --- quantizers --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_equal_ggml_quantize_chunk(ggml_base: ctypes.CDLL, qtype: str) -> None:
    for name, x in cases().items():
        if x.shape[-1] % BLOCK_TYPES[qtype].block_size:
            continue
        for kind, importance in importances(x.shape[-1]).items():
            mine, theirs = ours(x, qtype, importance), quantize_chunk(ggml_base, x, qtype, importance)
            differ = int((mine != theirs).any(axis=1).sum())
            assert differ == 0, f"{qtype} {name} importance {kind}: {differ} of {len(mine)} blocks differ"
    # the importance reaches the bytes (llama.cpp's Q8_0 ignores it, and so do we)
    x = cases()["randn"]
    importance = importances(x.shape[-1])["random"]
    with_it, without = ours(x, qtype, importance), ours(x, qtype, None)
    assert np.array_equal(with_it, without) == (qtype == "q8_0")
    assert np.array_equal(without, quantize_chunk(ggml_base, x, qtype, None))


def test_importance_is_checked() -> None:
    x = torch.randn(4, 256)
    for qtype in ("q4_0", "q4_k"):
        with pytest.raises(ValueError, match="shape"):
            quantize_ggml(x, GGMLConfig(qtype), importance=torch.ones(128))
        with pytest.raises(ValueError, match="non-negative"):
            quantize_ggml(x, GGMLConfig(qtype), importance=-torch.ones(256))
        with pytest.raises(ValueError, match="finite"):
            quantize_ggml(x, GGMLConfig(qtype), importance=torch.full((256,), float("nan")))
    # float16/bfloat16 weights and a float64 importance vector are widened / narrowed to float32 first
    imp = torch.rand(256, dtype=torch.float64)
    a = quantize_ggml(x.bfloat16(), GGMLConfig("q4_1"), importance=imp).packed()
    b = quantize_ggml(x.bfloat16().float(), GGMLConfig("q4_1"), importance=imp.float()).packed()
    assert torch.equal(a, b)


# --- files --------------------------------------------------------------------------------------------------

CHUNK_SIZE = 512


def llama_imatrix_dat(stats: dict[str, tuple[np.ndarray, list[int]]], last_chunk: int, dataset: str) -> bytes:
    """``IMatrixCollector::save_imatrix_legacy`` byte by byte: stats are name -> (raw sums float32 [n], counts
    per matrix); entries whose counts are all 0 are skipped, as llama-imatrix does."""
    kept = sorted(name for name, (_, counts) in stats.items() if any(counts))
    out = struct.pack("<i", len(kept))
    for name in kept:
        values, counts = stats[name]
        out += struct.pack("<i", len(name)) + name.encode()
        ncall = (max(counts) + CHUNK_SIZE - 1) // CHUNK_SIZE
        out += struct.pack("<ii", ncall, values.size)
        per = values.size // len(counts)
        tmp = np.empty(values.size, dtype=np.float32)
        for i in range(values.size):
            count, value = np.float32(counts[i // per]), values[i]
            if count == 0:
                value, count = np.float32(1.0), np.float32(1.0)
            tmp[i] = (value / count) * np.float32(ncall)
        out += tmp.astype("<f4").tobytes()
    return out + struct.pack("<ii", last_chunk, len(dataset)) + dataset.encode()


def example_stats() -> dict[str, tuple[np.ndarray, list[int]]]:
    g = np.random.default_rng(0)
    return {
        "blk.0.attn_q.weight": ((g.random(256) * 50).astype(np.float32), [5 * CHUNK_SIZE]),
        "blk.0.ffn_down.weight": ((g.random(512) * 1e3).astype(np.float32), [5 * CHUNK_SIZE - 7]),
        "blk.1.ffn_up_exps.weight": ((g.random(3 * 64) * 9).astype(np.float32), [700, 0, 2560]),  # experts
        "output.weight": ((g.random(256) * 3).astype(np.float32), [1]),
        "blk.1.unused.weight": (np.zeros(32, dtype=np.float32), [0]),  # no data: not written
    }


def test_legacy_dat_reads_as_llama_cpp_writes_it(tmp_path: Path) -> None:
    stats = example_stats()
    raw = llama_imatrix_dat(stats, last_chunk=5, dataset="calibration.txt")
    path = tmp_path / "imatrix.dat"
    path.write_bytes(raw)
    m = read_imatrix(path)
    assert m.layout == "dat" and m.chunks == 5 and m.datasets == ("calibration.txt",) and m.chunk_size == 0
    assert sorted(m.entries) == sorted(n for n in stats if n != "blk.1.unused.weight")
    experts = m.entries["blk.1.ffn_up_exps.weight"]
    assert experts.counts.tolist() == [5.0] and experts.n_mat == 1 and experts.n_per_row == 192  # ceil(2560/512)
    for name, entry in m.entries.items():
        ncall = np.float32(int(entry.counts[0]))
        assert np.array_equal(m.importance(name).numpy(), entry.sums.numpy() / ncall), name
    # the expert with no data was stored as ones, so its importance is exactly 1
    assert torch.equal(m.importance("blk.1.ffn_up_exps.weight", 64)[1], torch.ones(64))
    # written again: the same bytes
    write_imatrix(m, tmp_path / "again.dat")
    assert (tmp_path / "again.dat").read_bytes() == raw
    # llama.cpp's reader accepts a file without the trailer, or with only the chunk count
    body_end = len(raw) - 8 - len("calibration.txt")
    for end, chunks in ((body_end, 0), (body_end + 4, 5)):
        path.write_bytes(raw[:end])
        short = read_imatrix(path)
        assert short.chunks == chunks and short.datasets == () and sorted(short.entries) == sorted(m.entries)


def gguf_example() -> ImportanceMatrix:
    g = torch.Generator().manual_seed(2)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry(torch.rand(256, generator=g) * 3e3, torch.tensor([2560.0],
                                                                                            dtype=torch.float64)),
        "blk.0.ffn_down.weight": ImatrixEntry(torch.rand(512, generator=g) * 7e4, torch.tensor([2553.0],
                                                                                             dtype=torch.float64)),
        "blk.0.attn_k.weight": ImatrixEntry(torch.randint(0, 1000, (256,), generator=g).float() * 2560,
                                            torch.tensor([2560.0], dtype=torch.float64)),  # integer importance
        "blk.1.ffn_up_exps.weight": ImatrixEntry(torch.rand(3 * 64, generator=g) * 100,
                                                 torch.tensor([700.0, 0.0, 2560.0], dtype=torch.float64)),
    }
    return ImportanceMatrix(entries, chunks=5, datasets=("wiki.train.raw", "code.txt"), chunk_size=CHUNK_SIZE)


def test_gguf_round_trip(tmp_path: Path) -> None:
    m = gguf_example()
    path = tmp_path / "imatrix.gguf"
    write_imatrix(m, path)
    back = read_imatrix(path)
    assert back.layout == "gguf" and back.chunks == 5 and back.chunk_size == CHUNK_SIZE
    assert back.datasets == ("wiki.train.raw", "code.txt")
    assert sorted(back.entries) == sorted(m.entries)
    for name, entry in m.entries.items():
        assert torch.equal(back.entries[name].sums, entry.sums) and torch.equal(back.entries[name].counts,
                                                                                  entry.counts)
        assert torch.equal(back.importance(name), m.importance(name))
    # llama-quantize's importance: in_sum2 / count per matrix in float32, 1 where the count is 0
    experts = back.importance("blk.1.ffn_up_exps.weight", 64)
    sums = m.entries["blk.1.ffn_up_exps.weight"].sums.reshape(3, 64)
    assert torch.equal(experts[0], sums[0] / torch.tensor(700.0)) and torch.equal(experts[1], torch.ones(64))
    assert torch.equal(experts[2], sums[2] / torch.tensor(2560.0))
    # the file's structure, as llama-imatrix writes it
    reader = gguf.GGUFReader(path)
    assert [f for f in reader.fields if not f.startswith("GGUF.")] == [
        "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.fields["general.type"].contents() == "imatrix"
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.1.ffn_up_exps.weight.in_sum2"] == [64, 3] and shapes["blk.1.ffn_up_exps.weight.counts"] == [1, 3]
    assert shapes["blk.0.attn_q.weight.in_sum2"] == [256] and shapes["blk.0.attn_q.weight.counts"] == [1]
    assert [t.name for t in reader.tensors] == [n + s for n in sorted(m.entries) for s in (".in_sum2", ".counts")]
    # no datasets: an empty string array, which llama.cpp still counts as metadata
    empty = ImportanceMatrix(m.entries, chunks=1, chunk_size=CHUNK_SIZE)
    write_imatrix(empty, path)
    assert read_imatrix(path).datasets == ()


def test_gguf_bytes_equal_llama_cpp_writer(ggml_base: ctypes.CDLL, tmp_path: Path) -> None:
    """The same entries through ``save_imatrix``'s calls (gguf_set_*, ggml_new_tensor_2d, gguf_add_tensor,
    gguf_write_to_file) in llama.cpp's own gguf writer: the same file."""
    lib = ggml_base

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    lib.ggml_init.argtypes, lib.ggml_init.restype = [InitParams], ctypes.c_void_p
    lib.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_new_tensor_2d.restype = ctypes.c_void_p
    lib.ggml_set_name.argtypes, lib.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    lib.ggml_get_data.argtypes, lib.ggml_get_data.restype = [ctypes.c_void_p], ctypes.c_void_p
    lib.gguf_init_empty.argtypes, lib.gguf_init_empty.restype = [], ctypes.c_void_p
    lib.gguf_set_val_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.gguf_set_arr_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                     ctypes.c_size_t]
    lib.gguf_set_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.gguf_add_tensor.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.gguf_write_to_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]
    lib.gguf_write_to_file.restype = ctypes.c_bool
    lib.gguf_free.argtypes, lib.ggml_free.argtypes = [ctypes.c_void_p], [ctypes.c_void_p]

    for datasets in (("wiki.train.raw", "code.txt"), ()):
        m = ImportanceMatrix(gguf_example().entries, chunks=5, datasets=datasets, chunk_size=CHUNK_SIZE)
        ctx = lib.ggml_init(InitParams(1 << 20, None, False))
        ctx_gguf = lib.gguf_init_empty()
        lib.gguf_set_val_str(ctx_gguf, b"general.type", b"imatrix")
        names = (ctypes.c_char_p * max(1, len(datasets)))(*[d.encode() for d in datasets])
        lib.gguf_set_arr_str(ctx_gguf, b"imatrix.datasets", names, len(datasets))
        lib.gguf_set_val_u32(ctx_gguf, b"imatrix.chunk_count", m.chunks)
        lib.gguf_set_val_u32(ctx_gguf, b"imatrix.chunk_size", m.chunk_size)
        for name in sorted(m.entries):
            entry = m.entries[name]
            for suffix, values, ne0 in ((".in_sum2", entry.sums.numpy(), entry.n_per_row),
                                        (".counts", entry.counts.numpy().astype(np.float32), 1)):
                t = lib.ggml_new_tensor_2d(ctx, 0, ne0, entry.n_mat)
                lib.ggml_set_name(t, (name + suffix).encode())
                data = np.ascontiguousarray(values, dtype=np.float32)
                ctypes.memmove(lib.ggml_get_data(t), data.ctypes.data, data.nbytes)
                lib.gguf_add_tensor(ctx_gguf, t)
        theirs, mine = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
        assert lib.gguf_write_to_file(ctx_gguf, str(theirs).encode(), False)
        lib.gguf_free(ctx_gguf)
        lib.ggml_free(ctx)
        write_imatrix(m, mine)
        assert mine.read_bytes() == theirs.read_bytes(), datasets
        back = read_imatrix(theirs)
        assert back.datasets == datasets and sorted(back.entries) == sorted(m.entries)


def test_conversions_keep_importance(tmp_path: Path) -> None:
    # .dat -> GGUF -> .dat
    dat = tmp_path / "a.dat"
    dat.write_bytes(llama_imatrix_dat(example_stats(), last_chunk=5, dataset="calibration.txt"))
    m = read_imatrix(dat)
    write_imatrix(m, tmp_path / "a.gguf")
    g = read_imatrix(tmp_path / "a.gguf")
    assert g.layout == "gguf" and g.chunks == 5 and g.chunk_size == 1 and g.datasets == ("calibration.txt",)
    write_imatrix(g, tmp_path / "b.dat")
    d = read_imatrix(tmp_path / "b.dat")
    for name in m.entries:
        assert torch.equal(g.importance(name), m.importance(name)), name
        assert torch.equal(d.importance(name), m.importance(name)), name
    assert (tmp_path / "b.dat").read_bytes() == dat.read_bytes()  # ncall and values come back as they were
    # GGUF -> .dat -> GGUF, with counts that are not multiples of the chunk size
    src = gguf_example()
    write_imatrix(src, tmp_path / "c.dat")
    c = read_imatrix(tmp_path / "c.dat")
    write_imatrix(c, tmp_path / "c.gguf")
    cg = read_imatrix(tmp_path / "c.gguf")
    for name in src.entries:
        assert torch.equal(c.importance(name), src.importance(name)), name
        assert torch.equal(cg.importance(name), src.importance(name)), name
    # llama-imatrix's ncall = ceil(max count / chunk_size) (5 here) where importance * ncall / ncall is exact for
    # the whole entry, else the power of two below it
    ncalls = {name: int(e.counts[0]) for name, e in c.entries.items()}
    for name, ncall in ncalls.items():
        expected = -(-int(src.entries[name].counts.max()) // CHUNK_SIZE)
        imp = src.importance(name).numpy()
        exact = np.array_equal((imp * np.float32(expected)).astype(np.float32) / np.float32(expected), imp)
        assert ncall == (expected if exact else 1 << (expected.bit_length() - 1)), name
    assert ncalls["blk.0.attn_k.weight"] == 5 and 4 in ncalls.values()
    # an overflow leaves only ncall = 1
    huge = ImportanceMatrix({"x.weight": ImatrixEntry(torch.full((32,), 3e38), torch.ones(1, dtype=torch.float64))},
                            chunks=9, chunk_size=1)
    converted = huge.to_layout("dat")
    assert int(converted.entries["x.weight"].counts[0]) == 1
    assert torch.equal(converted.importance("x.weight"), huge.importance("x.weight"))
    # an in-memory matrix keeps its layout's meaning: no conversion when the layout is already the one asked
    assert src.to_layout("gguf") is src


def test_bad_files_raise_input_error(tmp_path: Path) -> None:
    def fails(data: bytes | None, match: str, name: str = "bad") -> None:
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        try:
            read_imatrix(path)
        except InputError as err:
            message = str(err)
            assert re.search(match, message) and "\n" not in message and str(path) in message, message
        else:
            raise AssertionError(f"no InputError for {len(data or b'')} bytes")

    raw = llama_imatrix_dat(example_stats(), last_chunk=5, dataset="calibration.txt")
    body_end = len(raw) - 8 - len("calibration.txt")
    # truncations (the first entry's fields, every 11th byte, the trailer's bytes) but for the two short
    # trailers llama.cpp accepts
    for end in sorted(set(range(40)) | set(range(0, len(raw), 11)) | set(range(body_end - 8, len(raw)))):
        if end not in (body_end, body_end + 4):
            fails(raw[:end], "ends inside|too short|not an importance matrix")
    fails(raw + b"\0", "unexpected bytes")
    fails(b"", "too short")
    fails(b"hello, this is a text file and not an importance matrix\n", "not an importance matrix")
    fails(None, "cannot read", name="missing.dat")
    (tmp_path / "folder").mkdir()
    fails(None, "cannot read", name="folder")

    good = tmp_path / "good.gguf"
    write_imatrix(gguf_example(), good)
    data = good.read_bytes()
    for end in (3, 20, 60, 200, len(data) // 2, len(data) - 1):
        fails(data[:end], "too short|ends inside|ends at byte|claims|padding")

    def gguf_file(name: str, kv: dict[str, object], tensors: dict[str, np.ndarray], file_type: str = "") -> None:
        w = gguf.GGUFWriter(tmp_path / name, arch="llama")
        if file_type:
            w.add_type(file_type)
        for key, value in kv.items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_uint32(key, int(value))  # type: ignore[call-overload]
        for tname, array in tensors.items():
            w.add_tensor(tname, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    meta = {"imatrix.datasets": ["a.txt"], "imatrix.chunk_count": 1, "imatrix.chunk_size": 512}
    sums, counts = np.ones(32, dtype=np.float32), np.ones(1, dtype=np.float32)
    gguf_file("model.gguf", {}, {"blk.0.attn_q.weight": np.ones((4, 32), dtype=np.float32)}, "model")
    fails((tmp_path / "model.gguf").read_bytes(), "general.type 'model'")
    gguf_file("weights.gguf", {}, {"blk.0.attn_q.weight": np.ones((4, 32), dtype=np.float32)})
    fails((tmp_path / "weights.gguf").read_bytes(), "not an importance matrix")
    gguf_file("no_meta.gguf", {}, {"a.weight.in_sum2": sums, "a.weight.counts": counts}, "imatrix")
    fails((tmp_path / "no_meta.gguf").read_bytes(), "missing imatrix metadata")
    gguf_file("half.gguf", meta, {"a.weight.in_sum2": sums}, "imatrix")
    fails((tmp_path / "half.gguf").read_bytes(), "mismatched sums and counts")
    gguf_file("f16.gguf", meta, {"a.weight.in_sum2": sums.astype(np.float16), "a.weight.counts": counts}, "imatrix")
    fails((tmp_path / "f16.gguf").read_bytes(), "not F32")
    gguf_file("split.gguf", meta, {"a.weight.in_sum2": sums[:30], "a.weight.counts": np.ones(4, np.float32)},
              "imatrix")
    fails((tmp_path / "split.gguf").read_bytes(), "do not split")
    bad_kv = {**meta, "imatrix.chunk_count": "five"}
    gguf_file("kv.gguf", bad_kv, {"a.weight.in_sum2": sums, "a.weight.counts": counts}, "imatrix")
    fails((tmp_path / "kv.gguf").read_bytes(), "not UINT32")


# --- recipe --------------------------------------------------------------------------------------------------


def test_recipe_with_imatrix() -> None:
    """llama_tensor_get_type's one imatrix rule for our file types: ffn_down of the first n_layers / 8 layers goes
    from Q4_0 / Q5_0 to Q4_1 / Q5_1 (the row-length fallback still applies after it)."""
    def types(method: str, leaf: str, has_imatrix: bool, columns: int = 4096, n_layers: int = 32) -> list[str]:
        return [llama_cpp_type(method, f"blk.{i}.{leaf}", columns, n_layers, False, has_imatrix=has_imatrix)[0]
                for i in range(n_layers)]

    assert types("q4_0", "ffn_down.weight", True) == ["q4_1"] * 4 + ["q4_0"] * 28
    assert types("q5_0", "ffn_down.weight", True) == ["q5_1"] * 4 + ["q5_0"] * 28
    assert types("q4_0", "ffn_down.weight", True, n_layers=7) == ["q4_0"] * 7  # 7 // 8 == 0
    assert types("q4_0", "ffn_down.weight", False) == ["q4_0"] * 32
    assert llama_cpp_type("q4_0", "blk.0.ffn_down.weight", 48, 32, False, has_imatrix=True)[0] == "f16"
    leaves = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
              "ffn_up.weight", "ffn_down.weight")
    for method in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"):
        for columns in (4096, 576, 48):
            for leaf in leaves:
                if method in ("q4_0", "q5_0") and leaf == "ffn_down.weight" and columns % 32 == 0:
                    continue
                assert types(method, leaf, True, columns) == types(method, leaf, False, columns), (method, leaf)
            for name in ("output.weight", "token_embd.weight"):
                for tied in (False, True):
                    assert llama_cpp_type(method, name, columns, 32, tied, has_imatrix=True) == \
                        llama_cpp_type(method, name, columns, 32, tied)


# --- whole files -------------------------------------------------------------------------------------------

FILE_TYPES = ("q4_0", "q5_0", "q4_1", "q5_1", "q8_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("hidden", [256, 320])
def test_files_equal_llama_quantize_with_imatrix(ggml_base: ctypes.CDLL, hidden: int, tmp_path: Path) -> None:
    import llama_cpp

    from compress.formats.inputs import open_checkpoint
    from compress.pipeline.gguf import export_gguf

    folder = build_tiny_llama(tmp_path / "model", hidden=hidden, intermediate=2 * hidden, layers=8, vocab=512)
    f32 = tmp_path / "model.F32.gguf"
    with open_checkpoint(folder) as reader:
        export_gguf(reader, f32, "f32", tokenizer="none")
    source = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(f32).tensors}
    # an importance matrix for every matrix but the embedding (llama-imatrix never sees it), through a file
    g = torch.Generator().manual_seed(3)
    entries = {}
    for name, w in source.items():
        if w.ndim == 2 and name != "token_embd.weight":
            sums = torch.rand(w.shape[1], generator=g) * 1e3
            sums[torch.rand(w.shape[1], generator=g) < 0.1] = 0.0
            entries[name] = ImatrixEntry(sums, torch.tensor([1536.0], dtype=torch.float64))
    write_imatrix(ImportanceMatrix(entries, chunks=3, datasets=("random",), chunk_size=512), tmp_path / "im.gguf")
    imatrix = read_imatrix(tmp_path / "im.gguf")
    vectors = {name: imatrix.importance(name) for name in imatrix.entries}
    keep = [np.ascontiguousarray(v.numpy()) for v in vectors.values()]
    data = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()
    for i, (name, v) in enumerate(zip(vectors, keep, strict=True)):
        data[i].name, data[i].size = name.encode(), v.size
        data[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    seen: dict[str, Counter[str]] = {}
    for method in FILE_TYPES:
        theirs_path = tmp_path / f"llamacpp.{method}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}")
        params.nthread = 2
        params.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(), ctypes.byref(params)) == 0
        theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
        assert sorted(theirs) == sorted(source)
        counts: Counter[str] = Counter()
        for name, w in source.items():
            t = theirs[name]
            if w.ndim != 2:
                assert t.tensor_type.name == "F32"
                continue
            qtype, _ = llama_cpp_type(method, name, w.shape[1], 8, False, has_imatrix=True)
            assert t.tensor_type.name == qtype.upper(), (method, name, qtype, t.tensor_type.name)
            counts[qtype] += 1
            if qtype == "f16":
                continue
            q = quantize_ggml(torch.from_numpy(w), GGMLConfig(qtype), importance=vectors.get(name))
            assert np.array_equal(q.packed().numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), \
                (method, name, qtype)
        seen[method] = counts
        theirs_path.unlink()
    if hidden == 256:  # the imatrix guard: ffn_down of layer 0 (8 layers) in Q4_1 / Q5_1
        assert seen["q4_0"] == {"q4_0": 56, "q4_1": 1, "q6_k": 1}
        assert seen["q5_0"] == {"q5_0": 56, "q5_1": 1, "q6_k": 1}
    else:
        assert seen["q4_0"] == {"q4_0": 56, "q4_1": 1, "q8_0": 1}
        assert seen["q4_k_m"] == {"q5_0": 49, "q8_0": 9}
