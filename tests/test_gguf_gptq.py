"""GPTQ into llama.cpp's block types (``--format gguf --algorithm gptq``).

- The math (compress.quant.ggml_gptq): every type's element grid reproduces the type's own decoding; replacing
  the codes keeps every other byte (scales, minimums) and decodes, through the ``gguf`` package's reference
  dequantizer, to what we compute; on Q4_0 and Q4_1 the codes agree with an independent float64 implementation
  of the paper's sequential update on the blocks' own d and m; with correlated inputs every type's output error
  falls below the importance-searched grid it starts from.
- Through the CLI: a Q4_K_M file (K-quants, Q5_0 fallbacks, Q6_K output) whose tensor types are those of
  llama-quantize with an importance matrix, whose report recomputes from the file, that is byte-identical across
  runs and executors, that llama.cpp loads and runs with logits close to our own reading of the same file; and
  the statistics saved as an importance matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_gptq import correlated_problem, reference_gptq

from compress.formats.imatrix import read_imatrix
from compress.quant.ggml import GGMLConfig, quantize_ggml
from compress.quant.ggml_gptq import element_codes, element_grid, gptq_ggml, with_codes
from compress.quant.gptq import GPTQConfig, output_error

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"]


def problem(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """W [64, 512] (whole super-blocks) and a correlated H [512, 512]."""
    W, H = correlated_problem(out=64, inp=512, tokens=2048, seed=seed)
    return W, H


def reference_dequantize(qt, qtype: str) -> torch.Tensor:
    data = qt.packed().numpy()
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype.upper()]),
                                       dtype=np.float32)).reshape(qt.shape)


@pytest.mark.parametrize("qtype", TYPES)
def test_element_grid_and_code_replacement(qtype: str) -> None:
    W, H = problem()
    grid = quantize_ggml(W, GGMLConfig(qtype), importance=torch.diagonal(H).clone())
    eg = element_grid(grid)
    codes = element_codes(grid)
    assert torch.equal(eg.codes, codes) and int(codes.min()) >= eg.low and int(codes.max()) <= eg.high
    decoded = grid.dequantize(torch.float32)
    assert torch.allclose(eg.scale * codes.float() + eg.offset, decoded, rtol=0, atol=1e-6 * float(W.abs().max()))
    assert torch.equal(with_codes(grid, codes).packed(), grid.packed())

    g = torch.Generator().manual_seed(1)
    other = torch.randint(eg.low, eg.high + 1, tuple(W.shape), generator=g, dtype=torch.int16)
    replaced = with_codes(grid, other)
    assert torch.equal(element_codes(replaced), other)
    # everything but the codes is the grid's: the value of code q is still scale * q + offset
    expected = eg.scale * other.float() + eg.offset
    assert torch.allclose(reference_dequantize(replaced, qtype), expected, rtol=0, atol=1e-6 * float(W.abs().max()))
    assert torch.equal(reference_dequantize(replaced, qtype), replaced.dequantize(torch.float32))
    with pytest.raises(ValueError, match="codes must lie in"):
        with_codes(grid, other + (eg.high - eg.low + 1))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_gptq_ggml_matches_the_papers_sequential_update(qtype: str) -> None:
    W, H = correlated_problem(out=32, inp=128, tokens=512, seed=0)
    grid = quantize_ggml(W, GGMLConfig(qtype), importance=torch.diagonal(H).clone())
    d = grid.d.float().reshape(W.shape[0], -1)
    m = grid.m.float().reshape(W.shape[0], -1) if grid.m is not None else -8 * d  # the value of code 0

    def nearest(j: int, w: torch.Tensor) -> torch.Tensor:  # each row's block of column j, from d and m directly
        s, o = d[:, j // 32], m[:, j // 32]
        return (torch.round((w - o) / s)).clamp(0, 15) * s + o

    ours = gptq_ggml(W, H, grid)
    theirs = reference_gptq(W, H, nearest)
    Wq = ours.dequantize(torch.float32)
    assert (Wq.double() - theirs).abs().le(1e-6).float().mean() > 0.99
    assert output_error(W, Wq, H) == pytest.approx(output_error(W, theirs.float(), H), rel=0.02)
    assert torch.equal(ours.d, grid.d) and (grid.m is None or torch.equal(ours.m, grid.m))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("qtype", TYPES)
def test_gptq_ggml_lowers_output_error_and_keeps_the_scales(qtype: str, act_order: bool) -> None:
    W, H = problem()
    grid = quantize_ggml(W, GGMLConfig(qtype), importance=torch.diagonal(H).clone())
    ours = gptq_ggml(W, H, grid, GPTQConfig(act_order=act_order))
    before = output_error(W, grid.dequantize(torch.float32), H)
    after = output_error(W, ours.dequantize(torch.float32), H)
    assert after < 0.8 * before, (before, after)  # measured 0.45-0.7
    # only the code bytes changed: decode every element with the grid's scale and offset
    eg = element_grid(grid)
    assert torch.allclose(ours.dequantize(torch.float32), eg.scale * element_codes(ours).float() + eg.offset,
                          rtol=0, atol=1e-6 * float(W.abs().max()))


# --- through the CLI --------------------------------------------------------------------------------------------

CALIB = ("--algorithm", "gptq", "--calibration-samples", "4", "--calibration-length", "32")


def gguf_cli(capsys, model: Path, out: Path, method: str, *args: str) -> Path:
    r = run_cli(capsys, "quantize", model, "-o", out, "--method", method, "--format", "gguf", "-q", *args)
    assert r.rc == 0, r.err
    return out


def tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_cli_gptq_q4_k_m(model_256: Path, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "im.gguf"
    ours = gguf_cli(capsys, model_256, tmp_path / "g.gguf", "q4_k_m", *CALIB, "--save-imatrix", saved)
    again = gguf_cli(capsys, model_256, tmp_path / "g2.gguf", "q4_k_m", *CALIB, "--workers", "2")
    assert ours.read_bytes() == again.read_bytes()

    # the tensor types are llama-quantize's recipe with an importance matrix
    imatrix = gguf_cli(capsys, model_256, tmp_path / "im.gguf.out.gguf", "q4_k_m", "--imatrix", saved)
    mine, recipe = tensors(ours), tensors(imatrix)
    assert {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in recipe.items()}
    assert {t for t, _ in mine.values()} >= {"Q4_K", "Q6_K"}
    matrix = read_imatrix(saved)
    assert len(matrix.entries) == 2 * 7 + 1 and matrix.chunks == 4 and matrix.chunk_size == 32

    report = json.loads((tmp_path / "g.report.json").read_text())
    assert report["parameters"]["algorithm"] == "gptq"
    rows = {r["name"]: r for r in report["quantized"]}
    block_rows = [r for name, r in rows.items() if ".layers." in name]
    assert len(block_rows) == 14 and sum(r["algorithm"] == "gptq" for r in block_rows) >= 12
    assert all(r["output_error"] <= r["rtn_output_error"] for r in block_rows)
    assert report["totals"]["rms_output_error"] < 0.8 * report["totals"]["rtn_rms_output_error"]
    assert rows["lm_head.weight"]["algorithm"] == "imatrix"  # the head: importance-weighted search
    provenance = json.loads((tmp_path / "g.provenance.json").read_text())
    assert provenance["calibration"]["samples"] == 4 and provenance["gptq"]["act_order"] is False

    # the report's weight errors recompute from the file (the q/k rows permuted as llama.cpp stores them)
    from safetensors.torch import load_file

    from compress.formats.gguf_names import gguf_name, permute_qk
    source = load_file(model_256 / "model.safetensors")
    config = json.loads((model_256 / "config.json").read_text())
    for name, r in rows.items():
        W = source[name].float()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            W = permute_qk(W, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        qtype, data = mine[gguf_name(name)]
        decoded = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]),
                                              dtype=np.float32)).reshape(W.shape)
        err = float((decoded - W).double().norm() / W.double().norm())
        assert r["rel_fro"] == pytest.approx(err, rel=1e-6), name


@pytest.mark.slow
def test_gptq_gguf_runs_in_llama_cpp(model_256: Path, tmp_path: Path, capsys) -> None:
    """llama.cpp loads the GPTQ file and its logits agree with our own reading of it (transformers on the
    dequantized tensors) within the bounds tests/test_llamacpp.py sets for llama.cpp's own 4-bit files."""
    from test_llamacpp import agreement, llamacpp_logits, our_logits, within

    from compress.formats.gguf_reader import GGUFReader
    out = gguf_cli(capsys, model_256, tmp_path / "g.gguf", "q4_k_m", *CALIB, "--act-order")
    ids = list(range(1, 65))
    with GGUFReader(out) as reader:
        ours = our_logits(reader, ids)
    theirs = llamacpp_logits(out, ids)
    assert np.isfinite(theirs).all()
    assert within(agreement(ours, theirs), "q4_0"), agreement(ours, theirs)


def test_cli_gptq_q4_0_tiny(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    out = gguf_cli(capsys, tiny_llama_tok, tmp_path / "q.gguf", "q4_0", *CALIB, "--act-order")
    report = json.loads((tmp_path / "q.report.json").read_text())
    rows = [r for r in report["quantized"] if ".layers." in r["name"]]
    assert rows and sum(r["algorithm"] == "gptq" for r in rows) >= len(rows) - 2
    assert {t for t, _ in tensors(out).values()} >= {"Q4_0"}
