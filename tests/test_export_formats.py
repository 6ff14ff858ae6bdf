"""`compress quantize --format gguf|native`: the export registry wired into the command line.

GGUF through the command (report, sidecars, determinism, inspect, dequantize, bad input) on a tiny
Llama that carries SmolLM2's real tokenizer, and the native INT4-with-float-offsets layout (round
trip, exact equality with the GPTQ output of the same quantizer, validation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from compress.cli import main
from compress.formats import FORMATS
from compress.formats.inputs import open_checkpoint, open_model
from compress.formats.native import NativeFormat, pack_nibbles, unpack_nibbles
from compress.metrics import compare
from compress.quant import METHODS
from compress.quant.int4 import Int4Config, quantize_int4

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_tok: Path) -> Path:
    return tiny_llama_tok


def run(*args: Any) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def gguf_outputs(tiny_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf_cli")
    paths = {}
    for method in ("q4_0", "q4_1", "q8_0"):
        paths[method] = out / f"tiny-{method}.gguf"
        assert run("quantize", tiny_tok, "-o", paths[method], "--format", "gguf", "--method", method, "-q") == 0
    return paths


@pytest.mark.parametrize("method", ["q4_0", "q4_1", "q8_0"])
def test_gguf_report_measures_what_the_file_stores(tiny_tok: Path, gguf_outputs: dict[str, Path],
                                                   method: str) -> None:
    path = gguf_outputs[method]
    stem = path.name.removesuffix(".gguf")
    report = json.loads((path.parent / f"{stem}.report.json").read_text())
    provenance = json.loads((path.parent / f"{stem}.provenance.json").read_text())
    assert (path.parent / f"{stem}.report.md").read_text().startswith("# Quantization report")
    assert provenance["format"] == "gguf" and provenance["method"] == method
    assert report["format"] == "gguf" and report["method"] == method
    # 2 layers x 7 Linear weights + token_embd + output; norms kept in F32
    assert report["totals"]["tensors_quantized"] == 16
    assert report["totals"]["tensors_kept"] == 5
    assert report["totals"]["bytes_after"] == path.stat().st_size
    rows = {r["name"]: r for r in report["quantized"]}
    with open_checkpoint(tiny_tok) as src, open_checkpoint(path) as back:
        for name, row in rows.items():
            m = compare(src.get(name), back.get(name))  # our reader undoes the Q/K permutation
            assert row["rel_fro"] == pytest.approx(m.rel_fro, rel=1e-5, abs=1e-9), name
            assert row["max_abs"] == pytest.approx(m.max_abs, rel=1e-5, abs=1e-9), name
    bound = {"q8_0": 0.006, "q4_0": 0.13, "q4_1": 0.11}[method]  # Gaussian-like N(0, 0.05) weights
    linear = [r for n, r in rows.items() if ".layers." in n]
    assert max(r["rel_fro"] for r in linear) < bound
    expected_bits = {"q4_0": 4.5, "q4_1": 5.0, "q8_0": 8.5}[method]
    assert all(r["bits_per_weight"] == pytest.approx(expected_bits) for r in linear)


def test_gguf_inspect_and_dequantize(gguf_outputs: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = gguf_outputs["q4_1"]
    capsys.readouterr()
    assert run("inspect", path, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf"
    # the output projection stays at 8 bits; an untied token_embd (a lookup) takes the method's type
    assert info["by_quantization"]["Q4_1"]["tensors"] == 15
    assert info["by_quantization"]["Q8_0"]["tensors"] == 1
    assert info["bytes"] == path.stat().st_size
    out = tmp_path / "float"
    assert run("dequantize", path, "-o", out, "-q") == 0
    with open_checkpoint(path) as back, open_checkpoint(out) as deq:
        assert [i.name for i in back.infos()] == [i.name for i in deq.infos()]
        for info_ in back.infos():
            assert torch.equal(back.get(info_.name), deq.get(info_.name)), info_.name


def test_gguf_deterministic(tiny_tok: Path, gguf_outputs: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "again.gguf"
    assert run("quantize", tiny_tok, "-o", again, "--method", "q4_0", "-q") == 0  # gguf is q4_0's default format
    assert again.read_bytes() == gguf_outputs["q4_0"].read_bytes()
    first = json.loads(gguf_outputs["q4_0"].with_name("tiny-q4_0.report.json").read_text())
    assert json.loads((tmp_path / "again.report.json").read_text()) == first


def test_gguf_bad_input(tiny_tok: Path, gguf_outputs: dict[str, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    existing = gguf_outputs["q8_0"]
    before = existing.read_bytes()
    cases = [
        (["-o", tmp_path / "x.bin", "--format", "gguf", "--method", "q4_0"], "must end in .gguf"),
        (["-o", tmp_path / "x.gguf", "--format", "gguf", "--method", "q4_0", "--exclude", "mlp"],
         "--include/--exclude"),
        (["-o", existing, "--format", "gguf", "--method", "q8_0"], "already exists"),
        (["-o", tmp_path / "x.gguf", "--format", "gguf", "--method", "nf4"], "q4_0+gguf"),
        (["-o", tmp_path / "x", "--format", "gptq", "--method", "q4_0"], "int4+gptq"),
        (["-o", tmp_path / "x", "--format", "native", "--method", "nf4"], "int4+native"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert run("quantize", tiny_tok, *args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert existing.read_bytes() == before
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    # --force replaces the file (and its sidecars) after success
    assert run("quantize", tiny_tok, "-o", existing, "--format", "gguf", "--method", "q8_0", "-q", "--force") == 0
    assert existing.read_bytes() == before


def test_gguf_dry_run_writes_nothing(tiny_tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run("quantize", tiny_tok, "-o", tmp_path / "d.gguf", "--method", "q4_0", "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    types = {t["gguf_name"]: t["type"] for t in plan["tensors"]}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert types["blk.1.ffn_norm.weight"] == "F32"
    assert not list(tmp_path.iterdir())


# --- native: INT4 with float offsets -------------------------------------------------------------------


def test_nibble_packing_round_trip() -> None:
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 6)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("sym", [False, True])
def test_native_equals_gptq_dequantized(tiny_llama: Path, tmp_path: Path, sym: bool,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Same quantizer, two layouts: integer zeros (GPTQ) and float offsets (native) decode identically."""
    flag = "--sym" if sym else "--asym"
    native, gptq = tmp_path / "native", tmp_path / "gptq"
    for fmt, out in (("native", native), ("gptq", gptq)):
        assert run("quantize", tiny_llama, "-o", out, "--method", "int4", "--format", fmt, "--group-size", "32",
                   flag, "-q") == 0
    config = json.loads((native / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compress" and config["format"] == "int4-affine"
    assert config["group_size"] == 32 and config["offset_dtype"] == "float32"
    name = "model.layers.0.mlp.down_proj"
    with safe_open(str(native / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.qcodes").dtype == torch.uint8
        assert list(f.get_tensor(f"{name}.qcodes").shape) == [128, 128]  # [out, in / 2]
        assert f.get_tensor(f"{name}.qscales").dtype == torch.float16
        assert f.get_tensor(f"{name}.qoffsets").dtype == torch.float32
        assert list(f.get_tensor(f"{name}.qoffsets").shape) == [128, 8]  # 256 inputs / 32
    with open_model(native) as a, open_model(gptq) as b, open_checkpoint(tiny_llama) as src:
        assert a.format.name == "native"
        for info in src.infos():
            assert torch.equal(a.get(info.name), b.get(info.name)), info.name
            if info.name == f"{name}.weight":  # and it is the quantizer's own reconstruction
                q = quantize_int4(src.get(info.name), Int4Config(group_size=32, symmetric=sym))
                assert torch.equal(a.get(info.name), q.dequantize())
    capsys.readouterr()
    assert run("inspect", native, "--json") == 0
    assert json.loads(capsys.readouterr().out)["format"] == "native"
    assert run("dequantize", native, "-o", tmp_path / "deq", "-q") == 0


def test_native_validation() -> None:
    fmt = NativeFormat()
    assert "even" in (fmt.unsupported((8, 33), Int4Config()) or "")
    assert fmt.unsupported((8, 32), Int4Config()) is None
    qt = quantize_int4(torch.randn(16, 64), Int4Config(group_size=32))
    packed = fmt.pack("m.weight", qt)
    qc = fmt.quantization_config(Int4Config(group_size=32), torch.float32, [], ["m.weight"])
    back = fmt.unpack("m.weight", packed, qc, torch.float32)
    assert torch.equal(back.dequantize(), qt.dequantize())
    bad = dict(packed)
    bad["m.qoffsets"] = bad["m.qoffsets"][:, :1]
    with pytest.raises(ValueError, match="qoffsets"):
        fmt.unpack("m.weight", bad, qc, torch.float32)
    with pytest.raises(ValueError, match="missing"):
        fmt.unpack("m.weight", {k: v for k, v in packed.items() if not k.endswith("qscales")}, qc, torch.float32)
    with pytest.raises(ValueError, match="int4-affine"):
        fmt.unpack("m.weight", packed, {**qc, "format": "int3-something"}, torch.float32)


def test_registry_lists_every_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"bnb", "gptq", "native", "gguf"} <= set(FORMATS)
    for name, method in METHODS.items():
        assert name in FORMATS[method.default_format].methods
    capsys.readouterr()
    assert run("methods") == 0
    out = capsys.readouterr().out
    for name in ("q4_0", "q4_1", "q8_0", "native", "gguf"):
        assert name in out
