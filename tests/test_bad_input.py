"""Bad input, driven through the CLI: one line on stderr, exit code 2, nothing written, input untouched.

Every case runs ``compress.cli.main(argv)`` in-process and checks the product rule:

- exactly one line on stderr, ``error: <where>: <what>. <how to fix>`` (no traceback, no wrapping:
  the error console is replaced by one 40 columns wide, so a wrapped message would show);
- nothing on stdout, exit code 2;
- no OUT folder and no ``.OUT.tmp-*`` / ``.OUT.old-*`` folder beside it (or, when OUT existed
  before, OUT exactly as it was);
- every input file and folder unchanged (content hash, size, mode, mtime; folders' mtimes too, so
  a file created inside the input would show).

Corrupt checkpoints are written by hand (``struct`` + ``json``): a good two-tensor checkpoint
(one Linear weight inside a transformer block, one norm) and edits of it. Positive controls at the
end run the same harness on good checkpoints, and check that the harness itself can fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli as run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compress import cli

pytestmark = pytest.mark.usefixtures("narrow_err_console")

WEIGHT = "model.layers.0.mlp.down_proj.weight"  # quantized by default: 2-D '.weight' in a block
NORM = "model.norm.weight"  # kept: 1-D
ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.int8: "I8"}


# --- writing checkpoints by hand ---------------------------------------------------------------------


def header_blob(header: Any, *, length: int | None = None) -> bytes:
    """8-byte little-endian length + JSON header padded to 8 bytes (``length`` overrides the length)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def safetensors_bytes(tensors: dict[str, torch.Tensor],
                      edit: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """A safetensors file; ``edit`` may change the header dict before it is written (the data stays)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks: list[bytes] = []
    offset = 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if edit is not None:
        edit(header)
    return header_blob(header) + b"".join(chunks)


def good_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {WEIGHT: (torch.randn(8, 64, generator=g) * 0.05).to(dtype), NORM: torch.ones(64)}


def make_folder(folder: Path, blob: bytes | None = None, *, name: str = "model.safetensors") -> Path:
    """A checkpoint folder: config.json, a tokenizer file and one safetensors file (good unless ``blob``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / name).write_bytes(safetensors_bytes(good_tensors()) if blob is None else blob)
    return folder


def make_sharded(folder: Path, weight_map: Any = None, *, index: Any = None) -> Path:
    """Two shards (WEIGHT, NORM) and an index; ``weight_map`` / ``index`` replace the good ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    t = good_tensors()
    (folder / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes({WEIGHT: t[WEIGHT]}))
    (folder / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes({NORM: t[NORM]}))
    if weight_map is None:
        weight_map = {WEIGHT: "model-00001-of-00002.safetensors", NORM: "model-00002-of-00002.safetensors"}
    if index is None:
        index = {"metadata": {"total_size": 2304}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def gguf_bytes() -> bytes:
    """A small, well-formed GGUF (llama metadata, one F32 tensor), written by the gguf package."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_embedding_length(64)
        w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


# --- the harness -------------------------------------------------------------------------------------


def snapshot(*paths: Path) -> dict[str, Any]:
    """Every file and folder under ``paths``: mode, mtime, and size + sha256 for files."""
    snap: dict[str, Any] = {}
    for root in paths:
        if not root.exists() and not root.is_symlink():
            snap[str(root)] = None
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = p.lstat()
            if p.is_file() and not p.is_symlink():
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if os.access(p, os.R_OK) else "unreadable"
                snap[str(p)] = (st.st_mode, st.st_mtime_ns, st.st_size, digest)
            else:
                snap[str(p)] = (st.st_mode, st.st_mtime_ns)
    return snap


def leftovers(out: Path) -> list[str]:
    """Temporary or backup folders the atomic writer leaves beside OUT when it fails to clean up."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_rejected(capsys: pytest.CaptureFixture[str], argv: list[object], *, inputs: list[Path],
                    out: Path | None = None, words: tuple[str, ...] = (), out_existed: bool = False) -> str:
    """Run the CLI and check the product rule for bad input; returns the error line."""
    watched = [*inputs, *([out] if out is not None and out_existed else [])]
    before = snapshot(*watched)
    r = run(capsys, *argv)
    assert r.rc == 2, r
    assert r.out == "", r
    assert r.err.endswith("\n") and r.err.count("\n") == 1, f"not one line on stderr: {r.err!r}"
    line = r.err.rstrip("\n")
    assert line.startswith("error: ") and "Traceback" not in line, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    if out is not None:
        if not out_existed:
            assert not out.exists() and not out.is_symlink(), f"{out} was written"
        assert leftovers(out) == [], f"left beside {out}: {leftovers(out)}"
    assert snapshot(*watched) == before, "an input (or the existing OUT) was changed"
    return line


def quantize_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, *words: str,
                      extra: tuple[object, ...] = (), inputs: list[Path] | None = None) -> str:
    out = tmp_path / "out"
    return assert_rejected(capsys, ["quantize", model, "-o", out, *extra], inputs=inputs or [model], out=out,
                           words=(str(model), *words))


# --- missing, unreadable, empty inputs ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["quantize", "dequantize", "inspect"])
def test_missing_input(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    model, out = tmp_path / "no-such-model", tmp_path / "out"
    argv: list[object] = [command, model] + ([] if command == "inspect" else ["-o", out])
    assert_rejected(capsys, argv, inputs=[tmp_path], out=None if command == "inspect" else out,
                    words=(str(model), "no such file or folder", "Check the path"))


@pytest.mark.parametrize("target", ["file", "shard-in-folder"])
def test_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, target: str) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading, so the file stays readable")
    folder = make_folder(tmp_path / "in")
    weights = folder / "model.safetensors"
    weights.chmod(0)
    try:
        model = weights if target == "file" else folder
        quantize_rejected(capsys, tmp_path, model, "readable", inputs=[folder])
    finally:
        weights.chmod(0o644)


@pytest.mark.parametrize("contents", ["empty", "config-only", "pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_folder_without_safetensors(capsys: pytest.CaptureFixture[str], tmp_path: Path, contents: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    words: tuple[str, ...] = ("no model.safetensors", "Point at")
    if contents != "empty":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if contents.startswith("pytorch_model"):
        torch.save({WEIGHT: torch.zeros(2, 2)}, folder / "pytorch_model.bin")
        if contents.endswith(".json"):
            (folder / "pytorch_model.bin").rename(folder / "pytorch_model-00001-of-00001.bin")
            (folder / contents).write_text(json.dumps({"weight_map": {WEIGHT: "pytorch_model-00001-of-00001.bin"}}))
        words = ("pickle", "safetensors", "save_pretrained")
    quantize_rejected(capsys, tmp_path, folder, *words)
    assert_rejected(capsys, ["inspect", folder], inputs=[folder], words=(str(folder), *words))


def test_unknown_file_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    torch.save({WEIGHT: torch.zeros(2, 2)}, model)
    quantize_rejected(capsys, tmp_path, model, "unknown file type", "'.bin'")


# --- corrupt safetensors -----------------------------------------------------------------------------

GOOD = safetensors_bytes(good_tensors())
HEADER_END = 8 + struct.unpack("<Q", GOOD[:8])[0]


def _overlap(h: dict[str, Any]) -> None:
    h[NORM]["data_offsets"] = [1024, 1280]  # inside WEIGHT's 0..2048


def _gap(h: dict[str, Any]) -> None:
    h[NORM]["data_offsets"] = [2056, 2312]  # 8 bytes after WEIGHT ends (and past the end of the file)


def _gap_first(h: dict[str, Any]) -> None:
    h[WEIGHT]["data_offsets"] = [8, 2056]  # data does not start at 0


def _beyond(h: dict[str, Any]) -> None:
    h[NORM]["shape"] = [128]
    h[NORM]["data_offsets"] = [2048, 2560]  # consistent with the shape, but the file ends at 2304


def _size_mismatch(h: dict[str, Any]) -> None:
    h[WEIGHT]["shape"] = [8, 32]  # 1024 bytes, offsets still span 2048


def _negative(h: dict[str, Any]) -> None:
    h[WEIGHT]["data_offsets"] = [-8, 2040]


def _dtype(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        h[WEIGHT]["dtype"] = name
    return edit


def _shape_not_list(h: dict[str, Any]) -> None:
    h[WEIGHT]["shape"] = "8x64"


def _no_offsets(h: dict[str, Any]) -> None:
    del h[WEIGHT]["data_offsets"]


CORRUPT_SAFETENSORS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "empty-file": (b"", ("0 bytes", "too short", "re-download")),
    "cut-inside-length": (GOOD[:5], ("5 bytes", "too short", "re-download")),
    "cut-inside-header": (GOOD[:20], (f"header claims {HEADER_END - 8} bytes but only 12 follow", "truncated")),
    "cut-at-header-end": (GOOD[:HEADER_END], ("promises 2304 bytes", "holds 0", "truncated")),
    "cut-inside-data": (GOOD[:HEADER_END + 1000], ("promises 2304 bytes", "holds 1000", "truncated")),
    "cut-one-byte-short": (GOOD[:-1], ("promises 2304 bytes", "holds 2303", "truncated")),
    "length-beyond-file": (struct.pack("<Q", len(GOOD)) + GOOD[8:],
                           (f"header claims {len(GOOD)} bytes but only {len(GOOD) - 8} follow", "truncated")),
    "length-huge": (struct.pack("<Q", 2**63) + GOOD[8:], (f"header claims {2**63} bytes", "truncated or corrupt")),
    "header-not-json": (header_blob(b"{not json") + GOOD[HEADER_END:], ("not valid JSON", "corrupt")),
    "header-not-utf8": (header_blob(b"\xff\xfe\x00") + GOOD[HEADER_END:], ("not valid JSON", "utf-8", "corrupt")),
    "header-a-list": (header_blob([1, 2]) + GOOD[HEADER_END:], ("not a JSON object", "corrupt")),
    "offsets-overlap": (safetensors_bytes(good_tensors(), _overlap), (NORM, "starts at byte", "corrupt")),
    "offsets-gap": (safetensors_bytes(good_tensors(), _gap), (NORM, "starts at byte 2056", "corrupt")),
    "offsets-gap-at-start": (safetensors_bytes(good_tensors(), _gap_first), (WEIGHT, "starts at byte 8")),
    "offsets-beyond-file": (safetensors_bytes(good_tensors(), _beyond), ("promises 2560", "truncated")),
    "size-not-shape-times-dtype": (safetensors_bytes(good_tensors(), _size_mismatch),
                                   (WEIGHT, "needs 1024 bytes", "corrupt")),
    "offsets-negative": (safetensors_bytes(good_tensors(), _negative), (WEIGHT, "offsets -8..2040")),
    "shape-not-a-list": (safetensors_bytes(good_tensors(), _shape_not_list), (WEIGHT, "malformed shape")),
    "entry-without-offsets": (safetensors_bytes(good_tensors(), _no_offsets), (WEIGHT, "malformed header entry")),
    "unknown-dtype": (safetensors_bytes(good_tensors(), _dtype("F128")), (WEIGHT, "unknown dtype 'F128'")),
    "dtype-torch-cannot-load": (safetensors_bytes(good_tensors(), _dtype("U32")),
                                (WEIGHT, "U32", "torch cannot load", "Convert")),
}


@pytest.mark.parametrize("case", list(CORRUPT_SAFETENSORS))
@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_corrupt_safetensors(capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str, as_file: bool) -> None:
    blob, words = CORRUPT_SAFETENSORS[case]
    folder = make_folder(tmp_path / "in", blob)
    weights = folder / "model.safetensors"
    model = weights if as_file else folder
    out = tmp_path / "out"
    assert_rejected(capsys, ["quantize", model, "-o", out], inputs=[folder], out=out, words=(str(weights), *words))
    assert_rejected(capsys, ["inspect", model], inputs=[folder], words=(str(weights), *words))


def test_u16_written_by_hand(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A 2-D block weight stored as U16 (no torch safetensors loader for it), header written by hand."""
    header = {WEIGHT: {"dtype": "U16", "shape": [8, 64], "data_offsets": [0, 1024]},
              NORM: {"dtype": "F32", "shape": [64], "data_offsets": [1024, 1280]}}
    blob = header_blob(header) + bytes(1024) + torch.ones(64).numpy().tobytes()
    folder = make_folder(tmp_path / "in", blob)
    quantize_rejected(capsys, tmp_path, folder, WEIGHT, "U16", "torch cannot load", inputs=[folder])


# --- sharded folders ---------------------------------------------------------------------------------


def test_index_names_missing_shard(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_sharded(tmp_path / "in")
    (folder / "model-00002-of-00002.safetensors").unlink()
    quantize_rejected(capsys, tmp_path, folder, "model-00002-of-00002.safetensors", NORM, "does not exist",
                      "Re-download")


@pytest.mark.parametrize("where", ["parent", "absolute", "absolute-inside", "subfolder"])
def test_index_points_outside_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str) -> None:
    """The shard exists (a valid safetensors file) but not directly inside the checkpoint folder."""
    folder = make_sharded(tmp_path / "ckpt" / "in")
    outside = tmp_path / "ckpt" / "x.safetensors"
    outside.write_bytes(safetensors_bytes({NORM: torch.ones(64)}))
    (folder / "sub").mkdir()
    shutil.copy(outside, folder / "sub" / "x.safetensors")
    shard = {"parent": "../x.safetensors", "absolute": str(outside),
             "absolute-inside": str(folder / "model-00002-of-00002.safetensors"),
             "subfolder": "sub/x.safetensors"}[where]
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {WEIGHT: "model-00001-of-00002.safetensors", NORM: shard}}))
    out = tmp_path / "out"
    what = "absolute path" if where.startswith("absolute") else "not directly inside the checkpoint folder"
    assert_rejected(capsys, ["quantize", folder, "-o", out], inputs=[tmp_path / "ckpt"], out=out,
                    words=(str(folder / "model.safetensors.index.json"), NORM, repr(shard), what, "fix the index"))


def test_symlinked_shards_are_accepted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The Hugging Face cache layout: snapshots/<rev>/<shard> are symlinks to ../../blobs/<hash>.

    The "inside the folder" rule is about the names in the index, not where symlinks lead (it used to
    compare resolved paths and rejected every sharded checkpoint in the HF cache).
    """
    snapshot_dir = make_sharded(tmp_path / "hub" / "snapshots" / "abc123")
    (tmp_path / "hub" / "blobs").mkdir()
    for i, p in enumerate(sorted(snapshot_dir.iterdir())):
        blob = tmp_path / "hub" / "blobs" / f"{i:040x}"
        p.rename(blob)
        p.symlink_to(Path("..", "..", "blobs", blob.name))
    before = snapshot(tmp_path / "hub")
    r = run(capsys, "quantize", snapshot_dir, "-o", tmp_path / "out", "--quiet")
    assert (r.rc, r.err) == (0, ""), r
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor(NORM), torch.ones(64))
    assert snapshot(tmp_path / "hub") == before


@pytest.mark.parametrize("index", [
    pytest.param({"metadata": {}}, id="no-weight_map"),
    pytest.param({"weight_map": ["model-00001-of-00002.safetensors"]}, id="weight_map-a-list"),
    pytest.param({"weight_map": "model-00001-of-00002.safetensors"}, id="weight_map-a-string"),
    pytest.param({"weight_map": {}}, id="weight_map-empty"),
    pytest.param([], id="index-a-list"),
])
def test_index_without_weight_map(capsys: pytest.CaptureFixture[str], tmp_path: Path, index: Any) -> None:
    folder = make_sharded(tmp_path / "in", index=index)
    quantize_rejected(capsys, tmp_path, folder, "model.safetensors.index.json", "no 'weight_map'")


def test_index_maps_to_non_string(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_sharded(tmp_path / "in", {WEIGHT: "model-00001-of-00002.safetensors", NORM: 2})
    quantize_rejected(capsys, tmp_path, folder, NORM, "non-string", "Fix the index")


def test_index_not_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_sharded(tmp_path / "in")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    quantize_rejected(capsys, tmp_path, folder, "model.safetensors.index.json", "not valid JSON")


def test_tensor_in_index_absent_from_shard(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_sharded(tmp_path / "in", {WEIGHT: "model-00001-of-00002.safetensors",
                                            NORM: "model-00002-of-00002.safetensors",
                                            "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors"})
    quantize_rejected(capsys, tmp_path, folder, "model.layers.0.mlp.up_proj.weight",
                      "model-00002-of-00002.safetensors", "does not contain it")


def test_truncated_shard(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_sharded(tmp_path / "in")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    assert_rejected(capsys, ["quantize", folder, "-o", out], inputs=[folder], out=out,
                    words=(str(shard), "truncated"))


# --- GGUF --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_gguf() -> bytes:
    return gguf_bytes()


@pytest.mark.parametrize("cut", ["10-bytes", "inside-first-key", "inside-metadata", "inside-tensor-info",
                                 "inside-data"])
def test_truncated_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_gguf: bytes, cut: str) -> None:
    where = {"10-bytes": 10, "inside-first-key": 40, "inside-metadata": good_gguf.index(b"llama.embedding") + 4,
             "inside-tensor-info": good_gguf.index(b"output_norm") + 4, "inside-data": len(good_gguf) - 16}[cut]
    words = {"10-bytes": ("10 bytes", "too short"), "inside-first-key": ("more than a 40-byte file can hold",),
             "inside-metadata": ("file ends inside", "metadata key #2"),
             "inside-tensor-info": ("file ends inside", "tensor #0"),
             "inside-data": ("output_norm.weight", "data ends at byte")}[cut]
    folder = tmp_path / "in"
    folder.mkdir()
    model = folder / "model.gguf"
    model.write_bytes(good_gguf[:where])
    out = tmp_path / "out"
    for argv in (["quantize", model, "-o", out], ["inspect", model], ["quantize", folder, "-o", out]):
        assert_rejected(capsys, argv, inputs=[folder], out=out if argv[0] == "quantize" else None,
                        words=(str(model), *words, "re-download"))


@pytest.mark.parametrize("start", [b"GGML", b"\x00\x00\x00\x00", b"PK\x03\x04"], ids=["GGML", "zeros", "zip"])
def test_gguf_wrong_magic(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_gguf: bytes,
                          start: bytes) -> None:
    model = tmp_path / "in" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(start + good_gguf[4:])
    quantize_rejected(capsys, tmp_path, model, "not a GGUF file", repr(start), "llama.cpp",
                      inputs=[model.parent])
    assert_rejected(capsys, ["inspect", model], inputs=[model.parent], words=(str(model), "not a GGUF file"))


def test_safetensors_named_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tmp_path / "in" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(GOOD)
    quantize_rejected(capsys, tmp_path, model, "not a GGUF file", inputs=[model.parent])


# --- dtypes that cannot be quantized -----------------------------------------------------------------


def test_float64_linear_weight(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tensors = good_tensors()
    tensors[WEIGHT] = tensors[WEIGHT].double()
    folder = make_folder(tmp_path / "in", safetensors_bytes(tensors))
    quantize_rejected(capsys, tmp_path, folder, WEIGHT, "float64", "cannot be quantized", "--exclude",
                      inputs=[folder])
    # the suggested fix works: excluded, the tensor is kept and nothing is left to quantize
    assert_rejected(capsys, ["quantize", folder, "-o", tmp_path / "out", "--exclude", "down_proj"],
                    inputs=[folder], out=tmp_path / "out", words=("no tensor is selected",))


def test_int8_linear_weight_is_kept_with_a_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An int8 2-D '.weight' in a block is not a float weight: it is kept as stored, never quantized.

    The plan's rule (documented in --include's help: it "also quantize[s] 2-D float weights"): non-float
    tensors are kept with the reason "not a float tensor", also when --include names them. They are not
    an error: integer tensors (e.g. masks, indices) are legitimate, and quantizing integers makes no sense.
    But where a Linear weight of the blocks is expected, it is odd: one warning line (never a silent exit 0).
    """
    int8_name = "model.layers.0.mlp.gate_proj.weight"
    tensors = {**good_tensors(), int8_name: torch.arange(512, dtype=torch.int8).reshape(8, 64)}
    folder = make_folder(tmp_path / "in", safetensors_bytes(tensors))
    before = snapshot(folder)
    for i, extra in enumerate([(), ("--include", "gate_proj")]):
        r = run(capsys, "quantize", folder, "--dry-run", "--json", *extra)
        assert r.rc == 0, r
        plan = {t["name"]: t for t in json.loads(r.out)["tensors"]}
        assert plan[int8_name]["action"] == "keep" and plan[int8_name]["reason"] == "not a float tensor (int8)"
        assert plan[WEIGHT]["action"] == "quantize"
        out = tmp_path / f"out{i}"
        r = run(capsys, "quantize", folder, "-o", out, "--quiet", *extra)
        assert r.rc == 0, r
        expected = [f"warning: 1 Linear weights of the blocks are not float and were kept as they are (first: "
                    f"'{int8_name}', int8)"]
        if extra:  # the --include names only that tensor
            expected.append("warning: --include 'gate_proj' matched 1 tensors, none of which can be quantized (not a "
                            "float tensor (int8))")
        assert r.err.strip().splitlines() == expected, r.err
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert torch.equal(f.get_tensor(int8_name), tensors[int8_name])
        kept = {k["name"]: k for k in json.loads((out / "report.json").read_text())["kept"]}
        assert kept[int8_name]["reason"] == "not a float tensor (int8)" and kept[int8_name]["dtype"] == "int8"
    assert snapshot(folder) == before


# --- non-finite weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_non_finite_weight(capsys: pytest.CaptureFixture[str], tmp_path: Path, value: float,
                           dtype: torch.dtype) -> None:
    tensors = {**good_tensors(dtype), "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 64, dtype=dtype)}
    tensors[WEIGHT][3, 7] = value
    tensors[WEIGHT][5, 1] = value
    folder = make_folder(tmp_path / "in", safetensors_bytes(tensors))
    quantize_rejected(capsys, tmp_path, folder / "model.safetensors", WEIGHT, "2 non-finite values",
                      "--exclude", extra=("--quiet",), inputs=[folder])
    # the suggested fix works: the excluded tensor is kept as it is and the rest is quantized
    out = tmp_path / "ok"
    r = run(capsys, "quantize", folder, "-o", out, "--quiet", "--exclude", "down_proj")
    assert (r.rc, r.err) == (0, ""), r
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor(WEIGHT).isfinite(), tensors[WEIGHT].isfinite())


def test_error_during_run_is_one_line_with_progress_bar(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tensors = good_tensors()
    tensors[WEIGHT][0, 0] = float("nan")
    folder = make_folder(tmp_path / "in", safetensors_bytes(tensors))
    quantize_rejected(capsys, tmp_path, folder, WEIGHT, "non-finite", inputs=[folder])


# --- the output path ---------------------------------------------------------------------------------


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "in")


@pytest.mark.parametrize("kind,force", [("folder", False), ("file", False), ("file", True), ("symlink", False),
                                        ("symlink", True)],
                         ids=["folder", "file", "file-force", "symlink", "symlink-force"])
def test_existing_output(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path, kind: str,
                         force: bool) -> None:
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
        (out / "marker.txt").write_text("keep me")
    elif kind == "file":
        out.write_text("keep me")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "marker.txt").write_text("keep me")
        out.symlink_to(tmp_path / "elsewhere")
    words = ("exists and is not a folder", "--force only replaces folders") if force else \
        ("already exists", "--force")
    assert_rejected(capsys, ["quantize", good_folder, "-o", out, *(["--force"] if force else [])],
                    inputs=[good_folder, tmp_path / "elsewhere"], out=out, out_existed=True,
                    words=(str(out), *words))
    assert_rejected(capsys, ["dequantize", good_folder, "-o", out, *(["--force"] if force else [])],
                    inputs=[good_folder, tmp_path / "elsewhere"], out=out, out_existed=True,
                    words=(str(out), *words))


@pytest.mark.parametrize("where", ["same", "inside", "inside-new", "contains-input", "symlink-to-input",
                                   "file-input-parent"])
@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_output_overlaps_input(capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str,
                               command: str) -> None:
    folder = make_folder(tmp_path / "work" / "in")
    (folder / "sub").mkdir()
    model: Path = folder
    if where == "same":
        out = folder
    elif where == "inside":
        out = folder / "sub"
    elif where == "inside-new":
        out = folder / "q"
    elif where == "contains-input":
        out = tmp_path / "work"
    elif where == "symlink-to-input":
        out = tmp_path / "link"
        out.symlink_to(folder)
    else:  # a .safetensors file given as input, OUT = the folder holding it
        model, out = folder / "model.safetensors", folder
    existed = out.exists() or out.is_symlink()
    assert_rejected(capsys, [command, model, "-o", out, "--force"], inputs=[tmp_path / "work"], out=out,
                    out_existed=existed, words=(str(out), "overlaps the input", "different output path"))


def test_output_under_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker / "out"
    assert_rejected(capsys, ["quantize", good_folder, "-o", out], inputs=[good_folder, blocker], out=None,
                    words=(str(blocker), "cannot create folder"))


@pytest.mark.parametrize("when", ["before-writing", "while-writing"])
def test_failed_run_leaves_no_new_parent_folders(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 when: str) -> None:
    """-o new/deep/out: the parent folders made for OUT are removed again when the run fails."""
    tensors = good_tensors()
    tensors[WEIGHT][0, 0] = float("nan")
    blob = safetensors_bytes(tensors) if when == "while-writing" else GOOD[:100]
    folder = make_folder(tmp_path / "in", blob)
    out = tmp_path / "new" / "deep" / "out"
    assert_rejected(capsys, ["quantize", folder, "-o", out, "--quiet"], inputs=[folder], out=out,
                    words=(str(folder / "model.safetensors"),))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_message_quotes_paths_literally(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tmp_path / "run:fire:" / "model"
    assert_rejected(capsys, ["inspect", model], inputs=[tmp_path], words=(str(model), "no such file or folder"))


# --- option values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("options,words", [
    pytest.param(["--block-size", "100"], ("block size 100", "--help"), id="block-size-100"),
    pytest.param(["--block-size", "0"], ("block size 0",), id="block-size-0"),
    pytest.param(["--method", "int4", "--group-size", "48"], ("group size 48", "--help"), id="group-size-48"),
    pytest.param(["--method", "int4", "--format", "bnb"], ("--format bnb", "--method int4", "nf4+bnb"),
                 id="int4-in-bnb"),
    pytest.param(["--method", "nf4", "--format", "gptq"], ("--format gptq", "--method nf4"), id="nf4-in-gptq"),
    pytest.param(["--shard-size", "abc"], ("--shard-size 'abc'", "5GB"), id="shard-size-abc"),
    pytest.param(["--shard-size", "0"], ("--shard-size '0'", "5GB"), id="shard-size-0"),
    pytest.param(["--shard-size", "-5MB"], ("--shard-size '-5MB'",), id="shard-size-negative"),
    pytest.param(["--device", "cuda"], ("--device cuda", "no CUDA", "--device cpu"), id="device-cuda"),
    pytest.param(["--device", "tpu"], ("tpu", "--device"), id="device-tpu"),
    pytest.param(["--include", "("], ("--include '('", "regular expression"), id="include-bad-regex"),
    pytest.param(["--exclude", "[z-a]"], ("--exclude '[z-a]'", "regular expression"), id="exclude-bad-regex"),
    pytest.param(["--exclude", "."], ("no tensor is selected", "--dry-run"), id="exclude-everything"),
    pytest.param(["--method", "q8"], ("q8", "--method"), id="unknown-method"),
    pytest.param(["--block-size", "abc"], ("abc", "--block-size"), id="block-size-not-int"),
    pytest.param(["--bogus"], ("--bogus",), id="unknown-option"),
    pytest.param(["--no-output"], ("missing output folder", "-o OUT"), id="missing-o"),
])
def test_invalid_options(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path,
                         monkeypatch: pytest.MonkeyPatch, options: list[str], words: tuple[str, ...]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv: list[object] = ["quantize", good_folder, *(["-o", out] if options != ["--no-output"] else [])]
    argv += [o for o in options if o != "--no-output"]
    assert_rejected(capsys, argv, inputs=[good_folder], out=out, words=words)


@pytest.mark.parametrize("options,words", [
    pytest.param([], ("Missing option", "--output"), id="missing-o"),
    pytest.param(["-o", "OUT", "--dtype", "int8"], ("int8", "--dtype"), id="bad-dtype"),
    pytest.param(["-o", "OUT", "--shard-size", "abc"], ("--shard-size 'abc'",), id="shard-size-abc"),
])
def test_dequantize_invalid_options(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path,
                                   options: list[str], words: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    argv = ["dequantize", good_folder, *[out if o == "OUT" else o for o in options]]
    assert_rejected(capsys, argv, inputs=[good_folder], out=out, words=words)


def test_dequantize_float_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path) -> None:
    out = tmp_path / "out"
    assert_rejected(capsys, ["dequantize", good_folder, "-o", out], inputs=[good_folder], out=out,
                    words=(str(good_folder), "no quantized weights found", "compress quantize"))


def test_dequantize_corrupt_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "in", GOOD[:HEADER_END + 1000])
    out = tmp_path / "out"
    assert_rejected(capsys, ["dequantize", folder, "-o", out], inputs=[folder], out=out,
                    words=(str(folder / "model.safetensors"), "truncated"))


# --- corrupt quantized checkpoints (dequantize, and quantize reading them) -----------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The good checkpoint quantized to bnb (nf4) and gptq (int4 g32)."""
    base = tmp_path_factory.mktemp("quantized")
    src = make_folder(base / "float")
    outs = {}
    for fmt, opts in {"bnb": [], "gptq": ["--method", "int4", "--group-size", "32"]}.items():
        outs[fmt] = base / fmt
        assert cli.main(["quantize", str(src), "-o", str(outs[fmt]), "--quiet", *opts]) == 0
    return outs


def damaged_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _shorten(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key][:1].clone()
    return edit


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[key]
    return edit


MODULE = WEIGHT.removesuffix(".weight")


@pytest.mark.parametrize("fmt,edit,words", [
    pytest.param("bnb", _shorten(WEIGHT), (WEIGHT,), id="bnb-codes-short"),
    pytest.param("bnb", _shorten(f"{WEIGHT}.absmax"), (WEIGHT, "absmax"), id="bnb-absmax-short"),
    pytest.param("bnb", _drop(f"{WEIGHT}.absmax"), (WEIGHT, "absmax"), id="bnb-no-absmax"),
    pytest.param("bnb", _drop(f"{WEIGHT}.quant_state.bitsandbytes__nf4"), (WEIGHT, "quant_state"),
                 id="bnb-no-quant-state"),
    pytest.param("gptq", _shorten(f"{MODULE}.qweight"), (MODULE, "qweight"), id="gptq-qweight-short"),
    pytest.param("gptq", _shorten(f"{MODULE}.qzeros"), (MODULE, "qzeros"), id="gptq-qzeros-short"),
    pytest.param("gptq", _shorten(f"{MODULE}.scales"), (MODULE, "scales"), id="gptq-scales-short"),
])
@pytest.mark.parametrize("command", ["dequantize", "quantize"])
def test_corrupt_quantized_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      quantized: dict[str, Path], fmt: str,
                                      edit: Callable[[dict[str, torch.Tensor]], None], words: tuple[str, ...],
                                      command: str) -> None:
    model = damaged_copy(quantized[fmt], tmp_path / "in", edit)
    out = tmp_path / "out"
    assert_rejected(capsys, [command, model, "-o", out, "--quiet"], inputs=[model], out=out,
                    words=(str(model), *words))


def test_dequantize_float_checkpoint_with_stale_quantization_config(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path, good_folder: Path) -> None:
    config = json.loads((good_folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (good_folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_rejected(capsys, ["dequantize", good_folder, "-o", out], inputs=[good_folder], out=out,
                    words=(str(good_folder), "no quantized weights found"))


# --- positive controls: the harness on good input ----------------------------------------------------


def test_good_checkpoint_passes(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path) -> None:
    """The hand-written checkpoint every corrupt case starts from is good: quantize, inspect, dequantize."""
    out, back = tmp_path / "out", tmp_path / "back"
    before = snapshot(good_folder)
    r = run(capsys, "quantize", good_folder, "-o", out, "--quiet")
    assert (r.rc, r.err) == (0, ""), r
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "report.json"} <= {
        p.name for p in out.iterdir()}
    r = run(capsys, "inspect", good_folder / "model.safetensors", "--json")
    assert (r.rc, r.err) == (0, "") and json.loads(r.out)["tensors"] == 2, r
    r = run(capsys, "dequantize", out, "-o", back, "--quiet")
    assert (r.rc, r.err) == (0, ""), r
    with safe_open(str(back / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(WEIGHT).shape == (8, 64)
    r = run(capsys, "quantize", good_folder, "-o", out, "--quiet", "--force")  # replacing a folder works
    assert (r.rc, r.err) == (0, ""), r
    assert leftovers(out) == [] and leftovers(back) == []
    assert snapshot(good_folder) == before


def test_sharded_and_gguf_controls(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_gguf: bytes) -> None:
    """The good sharded folder quantizes; the good GGUF passes the structural scan (it then fails on
    purpose-irrelevant grounds: it is a 1-tensor file, not a complete llama)."""
    folder = make_sharded(tmp_path / "sharded")
    r = run(capsys, "quantize", folder, "-o", tmp_path / "out", "--quiet")
    assert (r.rc, r.err) == (0, ""), r
    model = tmp_path / "model.gguf"
    model.write_bytes(good_gguf)
    line = assert_rejected(capsys, ["inspect", model], inputs=[model], words=(str(model),))
    assert "truncated" not in line and "not a GGUF" not in line and "ends inside" not in line, line


def test_tiny_llama_passes(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path) -> None:
    before = snapshot(tiny_llama)
    out = tmp_path / "out"
    r = run(capsys, "quantize", tiny_llama, "-o", out, "--quiet")
    assert (r.rc, r.out, r.err) == (0, "", ""), r
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert leftovers(out) == [] and snapshot(tiny_llama) == before


def test_harness_can_fail(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_folder: Path) -> None:
    """assert_rejected fails on a good run, and snapshot sees a same-size edit."""
    with pytest.raises(AssertionError):
        assert_rejected(capsys, ["quantize", good_folder, "-o", tmp_path / "out", "--quiet"], inputs=[good_folder],
                        out=tmp_path / "out")
    with pytest.raises(AssertionError, match="no such words"):
        assert_rejected(capsys, ["quantize", tmp_path / "missing", "-o", tmp_path / "o"], inputs=[],
                        words=("no such words",))
    before = snapshot(good_folder)
    weights = good_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert snapshot(good_folder) != before


# --- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (needs the right to mount, as root in CI has); skipped where it cannot be made."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_one_line_and_leaves_nothing(tiny_llama: Path, small_disk: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC: one line with the output's projected size and the free space, exit 2, no temporary output left,
    and an existing output replaced with --force stays intact."""
    good = small_disk / "out"
    assert run(capsys, "quantize", tiny_llama, "-o", good, "--method", "nf4", "-q").rc == 0  # ~0.45 MiB: fits
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    nf4 = tmp_path / "nf4"
    assert run(capsys, "quantize", tiny_llama, "-o", nf4, "--method", "nf4", "-q").rc == 0
    for target, extra in ((small_disk / "float", ()), (good, ("--force",))):  # float32: ~1.4 MiB, does not fit
        r = run(capsys, "dequantize", nf4, "-o", target, "-q", *extra)
        assert r.rc == 2 and r.out == ""
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: no space left on the device while writing {target}: "
                                                       "the output needs about 1.4 MiB, "), r.err
        assert "MiB were free there; nothing was written" in lines[0]
        assert sorted(p.name for p in small_disk.iterdir()) == ["out"]  # no temporary output
        assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # the existing output is intact


# --- odd inputs the run goes on with: a warning line and a note in the report, never a silent exit 0 --------


def odd_checkpoint(src: Path, folder: Path, case: str) -> Path:
    tensors = load_file(str(src / "model.safetensors"))
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    name = "model.layers.0.mlp.up_proj.weight"
    if case == "int-weight":
        tensors[name] = torch.ones(tuple(tensors[name].shape), dtype=torch.int32)
    elif case == "empty-weight":
        tensors[name] = torch.ones(0, tensors[name].shape[1])
    if case != "two-shards":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = list(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({n: tensors[n] for n in first}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in [*second, first[0]]}, str(folder / "model-00002-of-00002.safetensors"))
    index = {n: "model-00001-of-00002.safetensors" for n in first}
    index.update({n: "model-00002-of-00002.safetensors" for n in second})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


@pytest.mark.parametrize(("case", "args", "words"), [
    ("int-weight", (), "Linear weights of the blocks are not float and were kept as they are (first: "
                       "'model.layers.0.mlp.up_proj.weight', int32)"),
    ("empty-weight", (), "weights have a dimension of size 0 and were kept as they are"),
    ("two-shards", (), "tensors are stored in more than one shard"),
    ("include-norms", ("--include", "norm"), "--include 'norm' matched 5 tensors, none of which can be quantized"),
    ("include-nothing", ("--include", "zzz"), "--include 'zzz' matched no tensor"),
])
def test_odd_inputs_warn_and_note(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                  args: tuple[str, ...], words: str) -> None:
    src = tiny_llama if case.startswith("include") else odd_checkpoint(tiny_llama, tmp_path / "odd", case)
    out = tmp_path / "out"
    r = run(capsys, "quantize", src, "-o", out, "-q", *args)
    assert r.rc == 0, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and words in lines[0], r.err
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any(words in n for n in notes), notes
