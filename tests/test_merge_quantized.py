"""`compress merge --quantize`: QA-LoRA folding into float offsets, strategies for plain LoRA, the report.

The QA-LoRA fold must give dequant(quantized base) + dW to float32 precision with codes and scales
untouched; integer zero points (GPTQ) must lose at most half a step per group and say so; the
other strategies are checked against their definitions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge import make_adapter, qalora_adapter

from compress.cli import main
from compress.formats.inputs import open_model
from compress.merge.requant import (
    best_merge,
    expand_groups,
    fold,
    fold_requant,
    group_means,
    is_group_constant,
    refit,
    to_integer_zeros,
)
from compress.metrics import compare
from compress.quant.int4 import Int4Config, quantize_int4
from compress.quant.nf4 import NF4Config, quantize_nf4

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QA_MODULES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    with open_model(folder) as reader:
        return {i.name: reader.get(i.name).float() for i in reader.infos()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_quantized")
    base = build_tiny_llama(root / "base", hidden=64, intermediate=128, layers=2, vocab=128)
    paths = {"base": base, "root": root,
             "qa": qalora_adapter(root / "qa", 32, 3, lora_alpha=32),  # updates of 0.1-1 step
             "lora": make_adapter(base, root / "lora", 1, target_modules=["q_proj", "v_proj", "down_proj"])}
    for name, fmt in (("native", "native"), ("gptq", "gptq")):
        paths[name] = root / f"base-{name}"
        assert main(["quantize", str(base), "-o", str(paths[name]), "--method", "int4", "--format", fmt,
                     "--group-size", "32", "-q"]) == 0
    return paths


# --- the math -----------------------------------------------------------------------------------------


def test_fold_is_exact_and_keeps_codes_and_scales() -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 96) * 0.02
    q = quantize_int4(W, Int4Config(group_size=32))
    dW = expand_groups(torch.randn(64, 3) * 0.01, 96, 32)
    assert is_group_constant(dW, 32) and not is_group_constant(dW + 1e-3 * torch.randn(64, 96), 32)
    folded = fold(q, dW)
    assert torch.equal(folded.codes, q.codes) and torch.equal(folded.scales, q.scales)
    ideal = q.dequantize(torch.float32) + dW
    assert compare(ideal, folded.dequantize(torch.float32)).rel_fro < 1e-6
    with pytest.raises(ValueError, match="not constant"):
        fold(q, dW + 1e-3 * torch.randn(64, 96))


def test_fold_requant_refit_and_integer_zeros() -> None:
    torch.manual_seed(1)
    W = torch.randn(128, 128) * 0.02
    q = quantize_int4(W, Int4Config(group_size=32))
    deq = q.dequantize(torch.float32)
    dW = (torch.randn(128, 4) @ torch.randn(4, 128)) * 0.004
    ideal = deq + dW
    fr = fold_requant(q, dW)
    # scales unchanged, offsets moved by the group means, codes by the rounded rest
    assert torch.equal(fr.scales, q.scales)
    means = group_means(dW, 32)
    assert torch.allclose(fr.offsets, q.to_affine().offsets + means)
    rest = dW - expand_groups(means, 128, 32)
    expected = (q.codes.float() + torch.round(rest / expand_groups(q.scales, 128, 32))).clamp(0, 15)
    assert torch.equal(fr.codes, expected.to(torch.uint8))
    err_fr = compare(ideal, fr.dequantize(torch.float32)).rel_fro
    err_refit = compare(ideal, refit(q, dW, ideal).dequantize(torch.float32)).rel_fro
    assert err_refit <= err_fr
    assert err_fr < compare(ideal, deq).rel_fro  # better than dropping the update
    # integer offsets convert to zero points exactly
    exact = to_integer_zeros(q.to_affine())
    assert torch.equal(exact.dequantize(torch.float32), deq)


def test_best_merge_picks_the_smallest_error() -> None:
    torch.manual_seed(2)
    W = torch.randn(64, 64) * 0.02
    cfg = Int4Config(group_size=32)
    q = quantize_int4(W, cfg)
    dW = torch.randn(64, 64) * 0.002
    ideal = W + dW

    def quantize(x: torch.Tensor) -> Any:
        return quantize_int4(x, cfg)

    out = best_merge(dW, ideal, base_q=q, base_float=W, quantize=quantize, output_offsets="float")
    assert set(out.tried) == {"fold-requant", "refit", "requantize", "float"}  # fold: dW is not group-constant
    assert out.strategy == "float"  # with the float base, merge in float and quantize once (see choose())
    no_float = best_merge(dW, q.dequantize() + dW, base_q=q, base_float=None, quantize=quantize,
                          output_offsets="float")
    assert set(no_float.tried) == {"fold-requant", "refit", "requantize"}
    assert no_float.tried[no_float.strategy] == min(no_float.tried.values())
    group_dW = expand_groups(torch.randn(64, 2) * 0.01, 64, 32)  # QA-LoRA-like: the exact fold wins
    folded = best_merge(group_dW, q.dequantize() + group_dW, base_q=q, base_float=W, quantize=quantize,
                        output_offsets="float")
    assert folded.strategy == "fold" and folded.tried["fold"] < 1e-6
    integer = best_merge(group_dW, q.dequantize() + group_dW, base_q=q, base_float=W, quantize=quantize,
                         output_offsets="integer")
    assert integer.strategy == "float"  # rounded integer zeros are not exact: no preference for the fold
    assert out.tried["float"] == pytest.approx(compare(ideal, quantize(W + dW).dequantize()).rel_fro)
    assert out.tried["requantize"] == pytest.approx(
        compare(ideal, quantize(q.dequantize() + dW).dequantize()).rel_fro)
    nf4 = best_merge(dW, ideal, base_q=None, base_float=W, output_offsets="none",
                     quantize=lambda x: quantize_nf4(x, NF4Config()))
    assert set(nf4.tried) == {"float"}


# --- through the command ------------------------------------------------------------------------------


def test_qalora_fold_into_native_is_exact(setup: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Float base + QA-LoRA -> INT4 native: quantize the base, fold the update; and the same from the
    quantized base (bit-identical files)."""
    from_float, from_q = tmp_path / "from-float", tmp_path / "from-q"
    code, err = run(capsys, "merge", setup["base"], "--adapter", setup["qa"], "--quantize", "int4", "--format",
                    "native", "--group-size", "32", "-o", from_float, "-q")
    assert code == 0, err
    code, err = run(capsys, "merge", setup["native"], "--adapter", setup["qa"], "--quantize", "int4", "--format",
                    "native", "-o", from_q, "-q")
    assert code == 0, err
    assert (from_float / "model.safetensors").read_bytes() == (from_q / "model.safetensors").read_bytes()
    report = json.loads((from_q / "report.json").read_text())["requantization"]
    assert report["totals"]["strategies_used"] == {"fold": 2}
    assert report["totals"]["passed_through_unchanged"] == 12
    assert report["totals"]["max_rel_error"] < 1e-6 and report["totals"]["tensors_mostly_lost"] == 0
    # codes and scales are the base's; offsets differ by exactly the group update
    base_t = load_file(str(setup["native"] / "model.safetensors"))
    out_t = load_file(str(from_q / "model.safetensors"))
    for key in base_t:
        if key.endswith((".qcodes", ".qscales")) or not any(key.startswith(m[:-7]) for m in QA_MODULES):
            assert torch.equal(base_t[key], out_t[key]), key
    float_merge = tmp_path / "float-merge"  # dequantized base + dW, merged in float by the float path
    assert run(capsys, "dequantize", setup["native"], "-o", tmp_path / "deq", "-q")[0] == 0
    assert run(capsys, "merge", tmp_path / "deq", "--adapter", setup["qa"], "-o", float_merge, "-q")[0] == 0
    ideal, got = weights(float_merge), weights(from_q)
    for name in ideal:
        m = compare(ideal[name], got[name])
        assert m.rel_fro < 1e-6, (name, m)
    for name in QA_MODULES:  # the update is real, not lost
        assert compare(ideal[name], weights(tmp_path / "deq")[name]).rel_fro > 1e-3


def test_qalora_into_gptq_rounds_offsets_and_says_so(setup: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gptq"
    code, err = run(capsys, "merge", setup["gptq"], "--adapter", setup["qa"], "--quantize", "int4", "--strategy",
                    "fold", "-o", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["requantization"]["totals"]["strategies_used"] == {"fold": 2}
    notes = " ".join(report["merge"]["notes"])
    assert "integer zero points" in notes and "--format native" in notes
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    with open_model(setup["gptq"]) as base, open_model(out) as merged:
        for name in QA_MODULES:
            b, m = base.quantized(name), merged.quantized(name)
            assert torch.equal(b.codes, m.codes) and torch.equal(b.scales, m.scales)
    # every element within half a step (plus float32 noise) of dequant(base) + dW, except in groups
    # whose zero point hit the end of 0..15 (the clamp)
    assert run(capsys, "dequantize", setup["gptq"], "-o", tmp_path / "deq", "-q")[0] == 0
    assert run(capsys, "merge", tmp_path / "deq", "--adapter", setup["qa"], "-o", tmp_path / "ideal", "-q")[0] == 0
    ideal_w, got = weights(tmp_path / "ideal"), weights(out)
    with open_model(out) as merged:
        for name in QA_MODULES:
            qt = merged.quantized(name)
            n_in = ideal_w[name].shape[1]
            step = expand_groups(qt.scales, n_in, 32)
            inside = expand_groups(((qt.zeros > 0) & (qt.zeros < 15)).float(), n_in, 32).bool()
            assert inside.float().mean() > 0.6, name
            within = (got[name] - ideal_w[name]).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7
            assert bool(within[inside].all()), name


def test_nf4_merge_equals_quantizing_the_float_merge(setup: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Float base + LoRA -> NF4: the 'float' strategy is quantize(W + dW), i.e. merge then quantize."""
    direct, float_merge, two_step = tmp_path / "direct", tmp_path / "float", tmp_path / "two-step"
    assert run(capsys, "merge", setup["base"], "--adapter", setup["lora"], "--quantize", "nf4", "-o", direct,
               "-q")[0] == 0
    assert run(capsys, "merge", setup["base"], "--adapter", setup["lora"], "-o", float_merge, "-q")[0] == 0
    assert run(capsys, "quantize", float_merge, "--method", "nf4", "-o", two_step, "-q")[0] == 0
    assert (direct / "model.safetensors").read_bytes() == (two_step / "model.safetensors").read_bytes()
    assert json.loads((direct / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    rows = json.loads((direct / "report.json").read_text())["requantization"]["tensors"]
    assert {r["strategy"] for r in rows} == {"float"} and len(rows) == 6
    for r in rows:
        assert r["ideal"] == "float base + update"
        assert 0 < r["update_over_step"] < 100 and -1 <= r["realised_cosine"] <= 1


def test_lora_into_quantized_base_strategies(setup: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A quantized base without its float: the best of fold-requant/refit/requantize per tensor; with
    --float-base, 'float' joins; a named strategy is used as asked; untouched weights pass through."""
    auto, floated, named = tmp_path / "auto", tmp_path / "float", tmp_path / "named"
    assert run(capsys, "merge", setup["native"], "--adapter", setup["lora"], "--quantize", "int4", "--format",
               "native", "-o", auto, "-q")[0] == 0
    rows = json.loads((auto / "report.json").read_text())["requantization"]["tensors"]
    for r in rows:
        assert set(r["strategies_tried"]) == {"fold-requant", "refit", "requantize"}
        assert r["strategies_tried"][r["strategy"]] == min(r["strategies_tried"].values())
        assert r["ideal"] == "quantized base + update"
    base_t = load_file(str(setup["native"] / "model.safetensors"))
    out_t = load_file(str(auto / "model.safetensors"))
    untouched = [k for k in base_t if "k_proj" in k or "o_proj" in k or "gate_proj" in k]
    assert untouched and all(torch.equal(base_t[k], out_t[k]) for k in untouched)
    assert run(capsys, "merge", setup["native"], "--adapter", setup["lora"], "--quantize", "int4", "--format",
               "native", "--float-base", setup["base"], "-o", floated, "-q")[0] == 0
    rows = json.loads((floated / "report.json").read_text())["requantization"]["tensors"]
    assert all("float" in r["strategies_tried"] and r["ideal"] == "float base + update" for r in rows)
    assert run(capsys, "merge", setup["native"], "--adapter", setup["lora"], "--quantize", "int4", "--format",
               "native", "--strategy", "fold-requant", "-o", named, "-q")[0] == 0
    rows = json.loads((named / "report.json").read_text())["requantization"]["tensors"]
    assert {r["strategy"] for r in rows} == {"fold-requant"}
    # a strategy that cannot apply is an error naming the tensor and the reason; nothing is written
    code, err = run(capsys, "merge", setup["native"], "--adapter", setup["lora"], "--quantize", "int4", "--format",
                    "native", "--strategy", "fold", "-o", tmp_path / "fold")
    assert code == 2 and "--strategy fold cannot merge" in err and "not constant" in err and err.count("\n") == 1
    assert not (tmp_path / "fold").exists()
    code, err = run(capsys, "merge", setup["native"], "--adapter", setup["qa"], "--quantize", "nf4",
                    "--strategy", "fold", "-o", tmp_path / "nf4")
    assert code == 2 and "--strategy fold cannot merge" in err and not (tmp_path / "nf4").exists()


def test_update_lost_is_the_missing_share_along_the_update(setup: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The report's update_lost and realised_cosine, recomputed here: realised = dequant(merged) - dequant(base),
    dW = B A alpha/r from the adapter file; lost = 1 - <realised, dW> / ||dW||^2 in [0, 1]."""
    out = tmp_path / "out"
    assert run(capsys, "merge", setup["native"], "--adapter", setup["lora"], "--quantize", "int4", "--format",
               "native", "-o", out, "-q")[0] == 0
    rows = {r["tensor"]: r for r in json.loads((out / "report.json").read_text())["requantization"]["tensors"]}
    config = json.loads((setup["lora"] / "adapter_config.json").read_text())
    factors = load_file(str(setup["lora"] / "adapter_model.safetensors"))
    with open_model(setup["native"]) as base, open_model(out) as merged:
        for name, row in rows.items():
            module = "base_model.model." + name.removesuffix(".weight")
            dW = (factors[f"{module}.lora_B.weight"].double() @ factors[f"{module}.lora_A.weight"].double()
                  * (config["lora_alpha"] / config["r"]))
            realised = merged.get(name).double() - base.get(name).double()
            inner = float((realised * dW).sum())
            expected = min(1.0, max(0.0, 1.0 - inner / float((dW * dW).sum())))
            assert 0.0 <= row["update_lost"] <= 1.0
            assert row["update_lost"] == pytest.approx(expected, abs=1e-6), name
            assert row["realised_cosine"] == pytest.approx(inner / float(realised.norm() * dW.norm()), abs=1e-6)


def test_qalora_fold_into_gguf_q4_1(tiny_llama_tok: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4_1's per-block minimum is a float16 offset: a QA-LoRA update with groups of 32 goes into it."""
    import numpy as np

    import compress.pipeline.merged as merge_pipeline
    from compress.formats.gguf_names import permute_qk
    from compress.formats.inputs import open_checkpoint
    from compress.quant.ggml import GGMLConfig, quantize_ggml

    qa = qalora_adapter(tmp_path / "qa", 32, 5, lora_alpha=32)
    folded, plain = tmp_path / "folded.gguf", tmp_path / "plain.gguf"
    deltas_made: list[int] = []
    module_delta = merge_pipeline.module_delta
    monkeypatch.setattr(merge_pipeline, "module_delta", lambda *a, **k: deltas_made.append(1) or module_delta(*a, **k))
    code, err = run(capsys, "merge", tiny_llama_tok, "--adapter", qa, "--quantize", "q4_1", "-o", folded, "-q")
    assert code == 0, err
    assert len(deltas_made) == len(QA_MODULES)  # each update is made once: the fold reuses the export's merge
    monkeypatch.undo()
    report = json.loads((tmp_path / "folded.report.json").read_text())
    assert any("folded into the Q4_1 block minimums" in n for n in report["merge"]["notes"])
    # the same update merged in float and then quantized to Q4_1 (what happens without the fold)
    assert run(capsys, "merge", tiny_llama_tok, "--adapter", qa, "-o", tmp_path / "float", "-q")[0] == 0
    assert run(capsys, "quantize", tmp_path / "float", "--method", "q4_1", "-o", plain, "-q")[0] == 0
    with open_checkpoint(tiny_llama_tok) as src, open_checkpoint(tmp_path / "float") as fm, \
            open_checkpoint(folded) as got, open_checkpoint(plain) as requant:
        for name in QA_MODULES:
            W, merged = src.get(name).float(), fm.get(name).float()
            # Q4_1 blocks lie inside rows, so the Q/K row permutation commutes with quantizing
            ideal = quantize_ggml(W, GGMLConfig("q4_1")).dequantize(torch.float32) + (merged - W)
            folded_err = compare(ideal, got.get(name)).rel_fro
            assert folded_err < 1e-3, (name, folded_err)  # float16 minimums: half an ulp is 2^-12 relative
            # Q4_1 (min/max per block) is nearly translation-equivariant, so re-quantizing base + a constant
            # per block is close too; the fold is never worse and keeps the base's codes
            assert folded_err <= compare(ideal, requant.get(name)).rel_fro
        # stored blocks: d and the 16 code bytes are Q4_1(base)'s; only the minimums (bytes 2-3) moved
        import gguf

        raw = {t.name: t for t in gguf.GGUFReader(str(folded)).tensors}
        W = permute_qk(src.get(QA_MODULES[0]).float(), 4)  # q_proj, 4 heads in build_tiny_llama
        expected = quantize_ggml(W, GGMLConfig("q4_1")).packed().numpy().reshape(-1, 20)
        stored = np.asarray(raw["blk.0.attn_q.weight"].data).reshape(-1, 20)
        assert (stored[:, [0, 1, *range(4, 20)]] == expected[:, [0, 1, *range(4, 20)]]).all()
        assert (stored[:, 2:4] != expected[:, 2:4]).any()


def test_merge_to_gguf_k_quant_is_merge_then_quantize(tiny_llama_tok: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """merge --quantize q4_k_m writes the file that quantizing the float merge to q4_k_m writes (no fold applies:
    a K-quant's minimums are 6-bit codes), byte for byte."""
    import gguf
    import numpy as np

    qa = qalora_adapter(tmp_path / "qa", 32, 5, lora_alpha=32)
    merged_gguf, plain = tmp_path / "merged.gguf", tmp_path / "plain.gguf"
    assert run(capsys, "merge", tiny_llama_tok, "--adapter", qa, "--quantize", "q4_k_m", "-o", merged_gguf,
               "-q")[0] == 0
    assert run(capsys, "merge", tiny_llama_tok, "--adapter", qa, "-o", tmp_path / "float", "-q")[0] == 0
    assert run(capsys, "quantize", tmp_path / "float", "--method", "q4_k_m", "-o", plain, "-q")[0] == 0
    a = {t.name: t for t in gguf.GGUFReader(merged_gguf).tensors}
    b = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(b[name].data))
    # hidden 64 is not a multiple of 256: llama.cpp's fallbacks (Q5_0, and Q8_0 for the Q6_K tensors)
    assert {t.tensor_type.name for t in a.values()} == {"Q5_0", "Q8_0", "F32"}


def test_merge_to_gguf(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    # the tiny model has no tokenizer: a clear error, nothing written
    code, err = run(capsys, "merge", setup["base"], "--adapter", setup["lora"], "--quantize", "q8_0", "-o", out)
    assert code == 2 and "tokenizer" in err and not out.exists()
    assert not [p for p in tmp_path.iterdir()]


@pytest.mark.parametrize("case", ["format-pair", "strategy-without-quantize", "float-base-quantized",
                                  "float-base-mismatch", "float-base-shape"])
def test_bad_input(case: str, setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args: list[Any] = ["merge", setup["native"], "--adapter", setup["lora"], "-o", out]
    words: tuple[str, ...]
    if case == "format-pair":
        args += ["--quantize", "int4", "--format", "bnb"]
        words = ("cannot hold", "int4+gptq")
    elif case == "strategy-without-quantize":
        args += ["--strategy", "refit"]
        words = ("only with --quantize",)
    elif case == "float-base-quantized":
        args += ["--quantize", "int4", "--float-base", setup["gptq"]]
        words = ("--float-base is itself quantized",)
    elif case == "float-base-mismatch":
        other = build_tiny_llama(tmp_path / "other", hidden=32, intermediate=64, layers=1, vocab=128)
        args += ["--quantize", "int4", "--float-base", other]
        words = ("--float-base has no tensor",)
    else:  # same names, other MLP width: refused before anything is merged, however the tensors are merged
        other = build_tiny_llama(tmp_path / "other", hidden=64, intermediate=96, layers=2, vocab=128)
        args += ["--quantize", "int4", "--float-base", other]
        words = ("--float-base tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 96]",
                 "the base has [64, 128] (6 differ)")
    code, err = run(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["other"])


def test_stored_layout_of_a_fold(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert run(capsys, "merge", setup["native"], "--adapter", setup["qa"], "--quantize", "int4", "--format",
               "native", "-o", out, "-q")[0] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qoffsets").dtype == torch.float32
