"""`compress quantize --format gguf` with an importance matrix, end to end.

- ``--calibration`` computes the matrix block by block; its sums of squares equal hooks on the whole
  transformers model run on the same token samples; ``--save-imatrix`` writes it (GGUF or .dat, atomically
  with the model).
- The GGUF we write with it is tensor for tensor (types and bytes) what ``llama_model_quantize`` makes of our F32
  export with the same matrix (llama.cpp's own quantization through llama-cpp-python), for a K-quant mixture and
  a legacy type whose recipe changes with an importance matrix; ``--imatrix FILE`` reproduces the file exactly.
- ``--algorithm optimize`` without a matrix: llama.cpp's searches with uniform importance, never worse than the
  plain quantizer on the weight error, tensor by tensor.
- A matrix made for another model, or options that do not apply, end with one line, exit 2, nothing written.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from compress.calib.importance import calibration_tokens
from compress.calib.text import CalibrationOptions
from compress.formats.imatrix import ImatrixEntry, ImportanceMatrix, read_imatrix, write_imatrix

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB = ("--calibration", "default", "--calibration-samples", "4", "--calibration-length", "32")


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def llama_cpp_quantize(f32: Path, out: Path, method: str, imatrix: ImportanceMatrix) -> None:
    if os.environ.get("COMPRESS_REQUIRE_LLAMACPP"):
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    vectors = [np.ascontiguousarray(imatrix.importance(n).numpy()) for n in imatrix.entries]
    data = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()
    for i, (name, v) in enumerate(zip(imatrix.entries, vectors, strict=True)):
        data[i].name, data[i].size = name.encode(), v.size
        data[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}")
    params.nthread = 1
    params.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["q4_k_m", "q4_0"])
def test_calibrated_imatrix_gguf_equals_llama_quantize(model_256: Path, tmp_path: Path, capsys, method: str) -> None:
    from compress.formats.inputs import open_checkpoint
    from compress.pipeline.gguf import export_gguf

    ours = tmp_path / "ours.gguf"
    saved = tmp_path / "im.gguf"
    r = run_cli(capsys, "quantize", model_256, "-o", ours, "--method", method, "--format", "gguf", "-q", *CALIB,
                "--save-imatrix", saved)
    assert r.rc == 0, r.err
    matrix = read_imatrix(saved)
    assert matrix.chunks == 4 and matrix.chunk_size == 32 and len(matrix.entries) == 2 * 7 + 1  # + output.weight

    f32 = tmp_path / "f32.gguf"
    with open_checkpoint(model_256) as reader:
        export_gguf(reader, f32, "f32")
    theirs = tmp_path / "theirs.gguf"
    llama_cpp_quantize(f32, theirs, method, matrix)
    mine, ref = tensors(ours), tensors(theirs)
    assert sorted(mine) == sorted(ref)
    for name in ref:
        assert mine[name][0] == ref[name][0], name
        assert mine[name][1] == ref[name][1], name

    # --imatrix with the saved matrix gives the same file; a .dat copy of it too
    again = tmp_path / "again.gguf"
    assert run_cli(capsys, "quantize", model_256, "-o", again, "--method", method, "--format", "gguf", "-q",
                   "--imatrix", saved).rc == 0
    assert again.read_bytes() == ours.read_bytes()
    write_imatrix(matrix, tmp_path / "im.dat")
    via_dat = tmp_path / "dat.gguf"
    assert run_cli(capsys, "quantize", model_256, "-o", via_dat, "--method", method, "--format", "gguf", "-q",
                   "--imatrix", tmp_path / "im.dat").rc == 0
    assert tensors(via_dat) == mine
    report = json.loads((tmp_path / "ours.report.json").read_text())
    assert report["parameters"]["imatrix"] is True


@pytest.mark.slow
def test_computed_importance_equals_whole_model_hooks(model_256: Path, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "im.dat"
    r = run_cli(capsys, "quantize", model_256, "-o", tmp_path / "o.gguf", "--method", "q8_0", "--format", "gguf",
                "-q", *CALIB, "--save-imatrix", saved)
    assert r.rc == 0, r.err
    matrix = read_imatrix(saved)
    tokens, _ = calibration_tokens(model_256, CalibrationOptions("default", 4, 32, 0), [])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_256)).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def run(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
        return run

    from compress.formats.gguf_names import gguf_name
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook(gguf_name(n + ".weight")))
    with torch.no_grad():
        model(input_ids=tokens)
    assert set(sums) == set(matrix.entries)
    for name, expected in sums.items():
        torch.testing.assert_close(matrix.importance(name).double(), expected / tokens.numel(), rtol=1e-4, atol=1e-7)


def test_optimize_without_matrix_never_worse(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.gguf"
    r = run_cli(capsys, "quantize", tiny_llama_tok, "-o", out, "--method", "q4_0", "--format", "gguf", "-q",
                "--algorithm", "optimize")
    assert r.rc == 0, r.err
    report = json.loads((tmp_path / "o.report.json").read_text())
    rows = [q for q in report["quantized"] if "rtn_rel_fro" in q]
    assert rows and all(q["rel_fro"] <= q["rtn_rel_fro"] for q in rows)
    assert sum(q["algorithm"] == "optimize" for q in rows) >= len(rows) // 2
    assert report["totals"]["rms_rel_fro"] < report["totals"]["rtn_rms_rel_fro"]


@pytest.mark.parametrize(("args", "message"), [
    (("--algorithm", "gptq", "--imatrix", "IM"), "--imatrix gives only each column's importance"),
    (("--save-imatrix", "x.gguf"), "--save-imatrix needs an importance matrix"),
    (("--imatrix", "IM", *CALIB), "--imatrix and --calibration both give"),
])
def test_gguf_option_errors(tiny_llama_tok: Path, tmp_path: Path, capsys, args: tuple[str, ...], message: str) -> None:
    args = tuple(str(tmp_path / "im.gguf") if a == "IM" else a for a in args)
    r = run_cli(capsys, "quantize", tiny_llama_tok, "-o", tmp_path / "o.gguf", "--method", "q4_0", "--format",
                "gguf", *args)
    assert r.rc == 2 and message in r.err
    assert not (tmp_path / "o.gguf").exists()


def test_imatrix_of_another_model_is_refused(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    other = {"blk.0.attn_q.weight": ImatrixEntry(torch.ones(1000), torch.tensor([10.0], dtype=torch.float64))}
    write_imatrix(ImportanceMatrix(other, chunks=1, chunk_size=10), tmp_path / "other.gguf")
    foreign = {"blk.0.something.weight": ImatrixEntry(torch.ones(64), torch.tensor([10.0], dtype=torch.float64))}
    write_imatrix(ImportanceMatrix(foreign, chunks=1, chunk_size=10), tmp_path / "foreign.gguf")
    for name, message in (("other.gguf", "gives 1000 values for 'blk.0.attn_q.weight'"),
                          ("foreign.gguf", "no entry for any tensor of this model")):
        r = run_cli(capsys, "quantize", tiny_llama_tok, "-o", tmp_path / "o.gguf", "--method", "q4_0", "--format",
                    "gguf", "--imatrix", tmp_path / name)
        assert r.rc == 2 and message in r.err and len(r.err.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.gguf", "other.gguf"]
