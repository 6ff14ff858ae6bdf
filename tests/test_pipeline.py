"""`compress quantize / inspect / dequantize` end to end on tiny checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compress.cli import main
from compress.formats.inputs import open_checkpoint, open_model
from compress.formats.quantized import DequantizingReader
from compress.quant import make_config
from compress.quant.int4 import quantize_int4
from compress.quant.nf4 import quantize_nf4


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables print to a wide console so that assertions can find whole tensor names."""
    from rich.console import Console

    import compress.cli

    monkeypatch.setattr(compress.cli, "out_console", Console(width=250))


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def weights_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as r:
        return {i.name: r.get(i.name) for i in r.infos()}


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_quantize_writes_a_complete_deterministic_folder(tiny_llama: Path, tmp_path: Path, method: str) -> None:
    out1, out2 = tmp_path / "a", tmp_path / "b"
    assert run("quantize", tiny_llama, "-o", out1, "--method", method, "-q") == 0
    assert run("quantize", tiny_llama, "-o", out2, "--method", method, "-q", "--device", "cpu") == 0
    # Byte-identical weights, config and report; only the provenance differs.
    assert weights_digest(out1) == weights_digest(out2)
    for name in ("config.json", "report.json", "report.md"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    files = {p.name for p in out1.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "report.json", "report.md",
            "compress_provenance.json"} <= files
    assert (out1 / "generation_config.json").read_bytes() == (tiny_llama / "generation_config.json").read_bytes()
    config = json.loads((out1 / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == ("bitsandbytes" if method == "nf4" else "gptq")
    prov = json.loads((out1 / "compress_provenance.json").read_text())
    assert prov["method"] == method and prov["version"] and "quantize" in prov["argv"]
    assert prov["parameters"]["method"] == method and prov["input"] == str(tiny_llama.resolve())


def test_report_values_match_independent_computation(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert run("quantize", tiny_llama, "-o", out, "--method", "int4", "--group-size", "64", "-q") == 0
    report = json.loads((out / "report.json").read_text())
    src = source_tensors(tiny_llama)
    linear = [n for n in src if ".layers." in n and src[n].dim() == 2]
    assert {r["name"] for r in report["quantized"]} == set(linear)
    for row in report["quantized"]:
        W = src[row["name"]]
        Wq = quantize_int4(W, make_config("int4", group_size=64)).dequantize(torch.float32)
        rel = (torch.linalg.vector_norm((W - Wq).double()) / torch.linalg.vector_norm(W.double())).item()
        assert row["rel_fro"] == pytest.approx(rel, rel=1e-6)  # float32 differences, float64 sums
        assert row["sqnr_db"] == pytest.approx(-20 * torch.log10(torch.tensor(rel, dtype=torch.float64)).item())
        assert row["max_abs"] == pytest.approx((W - Wq).abs().max().item(), rel=1e-6)
        assert 0.99 < row["cosine"] < 1.0
        assert row["bits_per_weight"] == pytest.approx(4 + 20 / 64)
    rels = [r["rel_fro"] for r in report["quantized"]]
    assert rels == sorted(rels, reverse=True)  # worst first
    t = report["totals"]
    assert t["params_quantized"] == sum(src[n].numel() for n in linear)
    assert t["params_kept"] == sum(v.numel() for n, v in src.items() if n not in linear)
    # sizes on disk of the weight files, input and output (one definition with inspect)
    assert t["bytes_before"] == (tiny_llama / "model.safetensors").stat().st_size
    assert t["bytes_after"] == (out / "model.safetensors").stat().st_size
    assert t["compression_ratio"] == pytest.approx(t["bytes_before"] / t["bytes_after"])
    assert t["kept_by_reason"] == {"embedding": 1, "output head": 1, "1-D (norm scale or bias)": 5}


def _header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_bnb_output_holds_our_codes_and_dequantizes_back(tiny_llama_bf16: Path, tmp_path: Path) -> None:
    out, back = tmp_path / "q", tmp_path / "f"
    assert run("quantize", tiny_llama_bf16, "-o", out, "--method", "nf4", "--double-quant", "--block-size", "128",
               "-q") == 0
    src = source_tensors(tiny_llama_bf16)
    with open_model(out) as reader:
        assert isinstance(reader, DequantizingReader)
        for info in reader.infos():
            if reader.is_quantized(info.name):
                expected = quantize_nf4(src[info.name], make_config("nf4", block_size=128, double_quant=True))
                assert torch.equal(reader.get(info.name), expected.dequantize())
                assert info.dtype == torch.bfloat16
            else:
                assert torch.equal(reader.get(info.name), src[info.name])
    assert run("dequantize", out, "-o", back, "-q") == 0
    restored = source_tensors(back)
    assert set(restored) == set(src)
    config = json.loads((back / "config.json").read_text())
    assert "quantization_config" not in config
    with open_model(out) as reader:
        for name, tensor in restored.items():
            assert torch.equal(tensor, reader.get(name))


def test_sharded_output_and_sharded_input(tiny_llama: Path, tmp_path: Path) -> None:
    sharded, out = tmp_path / "s", tmp_path / "q"
    assert run("dequantize", *(), "--help") == 0
    # Re-shard the float model through `dequantize`-free path: quantize with tiny shards...
    assert run("quantize", tiny_llama, "-o", sharded, "--method", "int4", "--shard-size", "100KB", "-q") == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((sharded / s).exists() for s in shards)
    for name, shard in index["weight_map"].items():
        with safe_open(str(sharded / shard), framework="pt") as f:
            assert name in set(f.keys())
    # ...and read the sharded folder back as input (dequantize, then quantize again).
    assert run("dequantize", sharded, "-o", tmp_path / "f", "--shard-size", "50KB", "-q") == 0
    assert len(list((tmp_path / "f").glob("model-*.safetensors"))) > 1
    assert run("quantize", tmp_path / "f", "-o", out, "--method", "nf4", "-q") == 0


def test_dry_run_prints_plan_and_writes_nothing(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    assert run("quantize", tiny_llama, "-o", out, "--dry-run", "--json", "--method", "nf4") == 0
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    actions = {t["name"]: (t["action"], t["reason"]) for t in plan["tensors"]}
    assert actions["model.embed_tokens.weight"] == ("keep", "embedding")
    assert actions["lm_head.weight"] == ("keep", "output head")
    assert actions["model.norm.weight"][0] == "keep"
    assert actions["model.layers.0.self_attn.q_proj.weight"] == ("quantize", "Linear weight in a transformer block")
    # The projection is exact: a real run writes exactly that many tensor bytes.
    assert run("quantize", tiny_llama, "-o", out, "--method", "nf4", "-q") == 0
    st = out / "model.safetensors"
    assert plan["bytes_after"] == st.stat().st_size - _header_size(st)
    assert run("quantize", tiny_llama, "--dry-run") == 0  # no -o needed for a dry run
    summary = capsys.readouterr().out
    assert "projected size" in summary and "(every tensor: --verbose)" in summary
    # The summary: one row per action and reason with counts and shapes, no tensor names.
    words = " ".join(summary.split())
    quantized = [t for t in plan["tensors"] if t["action"] == "quantize"]
    assert f"Linear weight in a transformer block │ {len(quantized)} │" in words
    assert "q_proj" not in summary and len(summary.splitlines()) < 15
    assert run("quantize", tiny_llama, "--dry-run", "--verbose") == 0
    every = capsys.readouterr().out
    assert all(t["name"] in every for t in plan["tensors"])


def test_include_exclude(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    assert run("quantize", tiny_llama, "--dry-run", "--json", "--exclude", r"mlp\.", "--include", "lm_head") == 0
    plan = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert plan["model.layers.1.mlp.up_proj.weight"]["reason"] == "excluded by --exclude"
    assert plan["lm_head.weight"]["action"] == "quantize"
    assert plan["model.layers.1.self_attn.v_proj.weight"]["action"] == "quantize"
    out = tmp_path / "q"
    assert run("quantize", tiny_llama, "-o", out, "--exclude", r"mlp\.", "-q") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in qc["llm_int8_skip_modules"] and "lm_head" in qc["llm_int8_skip_modules"]


def test_gptq_fallback_for_unpackable_shapes(tmp_path: Path) -> None:
    from conftest import build_tiny_llama

    # intermediate 204 is not a multiple of 8 (GPTQ packing); hidden 120 is not a multiple of 32 (partial group)
    src = build_tiny_llama(tmp_path / "odd", hidden=120, intermediate=204)
    out = tmp_path / "q"
    assert run("quantize", src, "-o", out, "--method", "int4", "--group-size", "32", "-q") == 0
    report = json.loads((out / "report.json").read_text())
    kept = {k["name"]: k["reason"] for k in report["kept"]}
    assert any("multiples of 8" in r for r in kept.values())
    assert any("not a multiple of the group size" in n for n in report["notes"])
    # Whatever was kept is stored as the original float tensor and reads back unchanged.
    with open_model(out) as reader, open_checkpoint(src) as original:
        for name, reason in kept.items():
            if "multiples of 8" in reason:
                assert torch.equal(reader.get(name), original.get(name))


def test_inspect_reports_layout(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    assert run("quantize", tiny_llama, "-o", out, "--method", "int4", "--sym", "-q") == 0
    capsys.readouterr()
    assert run("inspect", out, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "gptq" and data["quantized_tensors"] == 14
    assert data["by_quantization"] == {"int4 g128 sym": {"tensors": 14, "bytes": data["by_quantization"]
                                                          ["int4 g128 sym"]["bytes"]}}
    assert data["parameters"] == sum(v.numel() for v in source_tensors(tiny_llama).values())
    assert data["bytes"] == (out / "model.safetensors").stat().st_size  # on disk, as quantize's report says
    assert data["by_dtype"]["float16+int32"]["tensors"] == 14  # packed codes and zeros int32, scales float16
    assert run("inspect", tiny_llama, "--json") == 0
    assert json.loads(capsys.readouterr().out)["format"] == "float"
    assert run("inspect", out, "--tensors") == 0
    assert "q_proj" in capsys.readouterr().out


def test_force_replaces_existing_output(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert run("quantize", tiny_llama, "-o", out, "--method", "int4", "-q") == 0
    (out / "stale.txt").write_text("old")
    assert run("quantize", tiny_llama, "-o", out, "--method", "nf4", "-q") == 2  # no --force
    assert (out / "stale.txt").exists()
    assert run("quantize", tiny_llama, "-o", out, "--method", "nf4", "-q", "--force") == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary or backup folder left


def test_json_output_and_tables(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    assert run("quantize", tiny_llama, "-o", tmp_path / "j", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["tensors_quantized"] == 14
    assert run("quantize", tiny_llama, "-o", tmp_path / "t") == 0
    text = capsys.readouterr().out
    assert "worst first" in text and "totals" in text
    assert run("methods") == 0
    assert "int4" in capsys.readouterr().out


def test_piped_output_is_never_cut(tmp_path: Path) -> None:
    """stdout into a pipe (a CI log): tables take the width they need, nothing ends in '…' (rich's default is 80
    columns and cuts cells)."""
    import os
    import subprocess
    import sys

    from compress.quant import METHODS

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "compress.cli", "methods"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    for name in METHODS:
        assert f"│ {name} " in r.stdout
    assert "https://arxiv.org/abs/2305.14314" in r.stdout  # a whole cell that 80 columns cut
    assert max(len(line) for line in r.stdout.splitlines()) > 80


def test_piped_progress_is_lines_not_a_bar(tiny_llama: Path, tmp_path: Path) -> None:
    """stderr into a pipe with the default COMPRESS_PROGRESS (auto): no bar (no terminal escapes, no carriage
    returns), one line when the phase ends with every task counted; COMPRESS_PROGRESS=off prints none."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_PROGRESS"}
    argv = [sys.executable, "-m", "compress.cli", "quantize", str(tiny_llama), "--method", "int4", "--group-size",
            "32"]
    r = subprocess.run([*argv, "-o", str(tmp_path / "q")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    n = len(report["quantized"]) + len(report["kept"])
    done = [line for line in r.stderr.splitlines() if ": done, " in line]
    assert len(done) == 1 and re.fullmatch(rf"int4 \(int4 g32 asym\): done, {n}/{n} tasks, .+ in [0-9.]+ s", done[0])
    r = subprocess.run([*argv, "-o", str(tmp_path / "q2")], capture_output=True, text=True,
                       env=env | {"COMPRESS_PROGRESS": "off"}, timeout=300)
    assert r.returncode == 0 and ": done, " not in r.stderr


def test_line_progress_is_rate_limited() -> None:
    """A line at most every interval (stages and task counts alike), and one when the phase ends."""
    import io

    from rich.console import Console

    from compress.render import LineProgress

    now = [0.0]
    buffer = io.StringIO()
    lines = LineProgress(Console(file=buffer, width=200), interval=10.0)
    lines.clock = lambda: now[0]
    lines.start("quantize", 1000, 4)
    for step in range(4):
        now[0] += 6.0
        lines.advance(f"t{step}", 250)
    lines.stage("writing")
    lines.finish()
    assert buffer.getvalue().splitlines() == ["quantize: 2/4 tasks, 500 B of 1.0 KB (50%)",
                                              "quantize: 4/4 tasks, 1.0 KB of 1.0 KB (100%)",
                                              "quantize: done, 4/4 tasks, 1.0 KB in 24.0 s"]


def test_gguf_input_end_to_end(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "smol"
    assert run("quantize", smollm2_gguf, "-o", out, "--method", "int4", "-q") == 0
    report = json.loads((out / "report.json").read_text())
    t = report["totals"]
    assert t["tensors_quantized"] == 210 and t["params_quantized"] == 106_168_320
    assert 0.09 < t["rms_rel_fro"] < 0.12
    assert any("576" in n and "group size 128" in n for n in report["notes"])
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["group_size"] == 128


def test_help_lists_fixed_value_sets(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    """Options whose values are a fixed set list them in --help, and a wrong value's error names them."""
    from compress.quant.int4 import GROUP_SIZES
    from compress.quant.nf4 import BLOCK_SIZES

    main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(map(str, GROUP_SIZES)) in text and ", ".join(map(str, BLOCK_SIZES)) in text
    assert run("quantize", tiny_llama, "-o", tmp_path / "x", "--method", "int4", "--group-size", "100") == 2
    err = capsys.readouterr().err
    assert "group size 100 is not one of 16, 32, 64" in err and "for the allowed values" not in err
