"""GPTQ (``--algorithm gptq``) and the calibration runner it stands on.

- The math (compress.quant.gptq): against an independent float64 implementation of the paper's sequential
  update (the explicit inverse-Hessian downdate, no Cholesky trick), codes agree and the output error is the
  same; with uncorrelated inputs of equal energy (H = I) nothing is compensated and the codes are the grid's own
  nearest codes; with correlated inputs the output error on them falls far below rounding to the same grid;
  the grid's parameters are never touched (INT4 scales/zeros, NF4 absmax), act-order included.
- The runner (compress.calib.runner): H = X^T X of every Linear of a block equals what hooks on the whole
  transformers model see (Llama and BERT), and block k+1 is calibrated on the outputs of the *quantized*
  block k.
- Through the CLI on a tiny Llama with a real tokenizer: the report's output errors are recomputed here, GPTQ
  beats RTN on them, the bytes are identical across runs and executors, and bad calibration input ends with
  one line, exit 2 and nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from compress.calib.runner import CalibrationRunner
from compress.calib.text import CalibrationOptions, token_samples
from compress.errors import InputError
from compress.formats.inputs import open_model
from compress.quant.gptq import GPTQConfig, gptq_quantize, output_error
from compress.quant.int4 import Int4Config
from compress.quant.nf4 import NF4Config
from compress.quant.optimize import optimize_int4, optimize_nf4

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def correlated_problem(out: int = 64, inp: int = 96, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) * 0.4 + torch.eye(inp)
    X = torch.randn(tokens, inp, generator=g) @ mix
    X[:, :4] *= 8  # a few inputs with much more energy, as real activations have
    W = torch.randn(out, inp, generator=g) * 0.05
    return W, X.T @ X


def reference_gptq(W: torch.Tensor, H: torch.Tensor, nearest, damp: float = 0.01) -> torch.Tensor:
    """The paper's sequential form in float64: quantize column j, spread its error with the current inverse
    Hessian, remove j from the inverse (OBS downdate). Returns the dequantized weights."""
    W = W.double().clone()
    H = H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.empty_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = nearest(j, W[:, j].float()).double()
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


def int4_nearest(grid):
    def nearest(j: int, w: torch.Tensor) -> torch.Tensor:
        s, z = grid.scales[:, j // grid.group_size], grid.zeros[:, j // grid.group_size].float()
        return (torch.round(w / s) + z).clamp(0, 15).sub(z).mul(s)
    return nearest


def test_gptq_matches_the_papers_sequential_update() -> None:
    W, H = correlated_problem()
    grid = optimize_int4(W, Int4Config(group_size=32))
    ours = gptq_quantize(W, H, grid)
    theirs = reference_gptq(W, H, int4_nearest(grid))
    Wq = ours.dequantize(torch.float32)
    assert (Wq.double() == theirs).float().mean() > 0.995  # float32 vs float64 may flip a rare tie
    assert output_error(W, Wq, H) == pytest.approx(output_error(W, theirs.float(), H), rel=0.02)
    # the grid is the layout's: parameters untouched, only codes chosen
    assert torch.equal(ours.scales, grid.scales) and torch.equal(ours.zeros, grid.zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_without_correlation_is_nearest_rounding(act_order: bool) -> None:
    W, _ = correlated_problem()
    grid = optimize_int4(W, Int4Config(group_size=32))
    ours = gptq_quantize(W, torch.eye(W.shape[1]) * 3.0, grid, GPTQConfig(act_order=act_order))
    assert torch.equal(ours.codes, grid.codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("kind", ["int4-asym", "int4-sym", "int4-affine", "nf4", "fp4-dq"])
def test_gptq_lowers_output_error_and_keeps_the_grid(kind: str, act_order: bool) -> None:
    W, H = correlated_problem(seed=3)
    if kind == "nf4":
        grid = optimize_nf4(W, NF4Config(block_size=64))
    elif kind == "fp4-dq":
        grid = optimize_nf4(W, NF4Config(block_size=32, double_quant=True, quant_type="fp4"))
    else:
        grid = optimize_int4(W, Int4Config(group_size=32, symmetric=kind == "int4-sym"),
                             float_offset=kind == "int4-affine")
    ours = gptq_quantize(W, H, grid, GPTQConfig(act_order=act_order))
    before = output_error(W, grid.dequantize(torch.float32), H)
    after = output_error(W, ours.dequantize(torch.float32), H)
    assert after < 0.7 * before, (before, after)  # measured 0.45-0.6
    for field in ("scales", "zeros", "offsets", "absmax", "nested_absmax"):
        if getattr(grid, field, None) is not None:
            assert torch.equal(getattr(ours, field), getattr(grid, field)), field
    assert ours.codes.dtype == torch.uint8 and ours.codes.shape == grid.codes.shape


# --- the calibration runner -----------------------------------------------------------------------------------


def whole_model_statistics(model: torch.nn.Module, tokens: torch.Tensor, block: str) -> dict[str, torch.Tensor]:
    """H of every Linear inside ``block`` (a module-name prefix), from hooks on the whole model."""
    H: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def run(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[name] = H.get(name, 0) + x.T @ x
        return run

    handles = [m.register_forward_pre_hook(hook(n + ".weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(block)]
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 2):
            model(input_ids=tokens[i:i + 2])
    for h in handles:
        h.remove()
    return H


def test_runner_statistics_equal_whole_model_hooks_llama(tiny_llama: Path) -> None:
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), attn_implementation="sdpa").eval()
    with open_model(tiny_llama) as reader:
        runner = CalibrationRunner(reader, tokens, torch.device("cpu"), batch=2)
        blocks = iter(runner)
        block0 = next(blocks)
        stats0 = block0.statistics()
        # quantize block 0 crudely: block 1 must then see what the perturbed block 0 produces
        perturbed = {n: (lin.weight * 1.1).detach().clone() for n, lin in block0.linears.items()}
        block0.finish(perturbed)
        stats1 = next(blocks).statistics()
    expected0 = whole_model_statistics(model, tokens, "model.layers.0.")
    assert set(stats0) == set(expected0) and len(stats0) == 7
    for name, st in stats0.items():
        assert st.rows == 4 * 24
        torch.testing.assert_close(st.H.double(), expected0[name], rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        for name, W in perturbed.items():
            model.get_submodule(name.removesuffix(".weight")).weight.copy_(W)
    expected1 = whole_model_statistics(model, tokens, "model.layers.1.")
    for name, st in stats1.items():
        torch.testing.assert_close(st.H.double(), expected1[name], rtol=1e-5, atol=1e-4)


def test_runner_statistics_equal_whole_model_hooks_bert(tmp_path: Path) -> None:
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "bert")
    tokens = torch.randint(0, 120, (4, 16), generator=torch.Generator().manual_seed(1))
    with open_model(tmp_path / "bert") as reader:
        runner = CalibrationRunner(reader, tokens, torch.device("cpu"), batch=2)
        blocks = iter(runner)
        first = next(blocks)
        first.finish({})
        stats = next(blocks).statistics()
    expected = whole_model_statistics(model, tokens, "encoder.layer.1.")
    assert set(stats) == set(expected) and len(stats) == 6
    for name, st in stats.items():
        torch.testing.assert_close(st.H.double(), expected[name], rtol=1e-5, atol=1e-4)


def test_runner_refuses_unknown_architecture(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with open_model(tmp_path / "gpt2") as reader, pytest.raises(InputError, match="does not know the architecture"):
        CalibrationRunner(reader, torch.zeros(1, 4, dtype=torch.int64), torch.device("cpu"))


def test_token_samples_are_seeded_windows() -> None:
    ids = torch.arange(1000)
    a = token_samples(ids, CalibrationOptions(samples=8, length=50, seed=3), "t")
    b = token_samples(ids, CalibrationOptions(samples=8, length=50, seed=3), "t")
    c = token_samples(ids, CalibrationOptions(samples=8, length=50, seed=4), "t")
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (8, 50)
    assert torch.equal(a - a[:, :1], torch.arange(50).expand(8, 50))  # contiguous windows of the text
    with pytest.raises(InputError, match="fewer than one sample"):
        token_samples(ids[:10], CalibrationOptions(samples=1, length=50), "t")


# --- through the CLI --------------------------------------------------------------------------------------------

CALIB = ("--algorithm", "gptq", "--calibration-samples", "6", "--calibration-length", "48")


def gptq_cli(capsys, model: Path, out: Path, *args: str) -> Path:
    result = run_cli(capsys, "quantize", model, "-o", out, "-q", *CALIB, *args)
    assert result.rc == 0, result.err
    return out


def test_cli_gptq_report_deterministic_and_better_than_rtn(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    args = ("--method", "int4", "--group-size", "32")
    a = gptq_cli(capsys, tiny_llama_tok, tmp_path / "a", *args)
    b = gptq_cli(capsys, tiny_llama_tok, tmp_path / "b", *args, "--workers", "2")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    report = json.loads((a / "report.json").read_text())
    assert report["parameters"]["algorithm"] == "gptq"
    rows = report["quantized"]
    assert len(rows) == 14 and all("output_error" in r and "rtn_output_error" in r for r in rows)
    assert sum(r["algorithm"] == "gptq" for r in rows) >= 12
    assert all(r["output_error"] <= r["rtn_output_error"] for r in rows)
    totals = report["totals"]
    assert totals["rms_output_error"] < 0.9 * totals["rtn_rms_output_error"]  # measured 0.81 (random weights)
    import hashlib

    from compress.calib.text import default_text
    calibration = json.loads((a / "compress_provenance.json").read_text())["calibration"]
    assert calibration == {"calibration": "default", "samples": 6, "length": 48, "seed": 0,
                           "sha256": hashlib.sha256(default_text().encode()).hexdigest()}
    # The report's weight errors are those of the stored weights, recomputed here.
    from safetensors.torch import load_file
    source = load_file(tiny_llama_tok / "model.safetensors")
    with open_model(a) as reader:
        for r in rows:
            W = source[r["name"]]
            err = float((reader.get(r["name"]) - W).double().norm() / W.double().norm())
            assert r["rel_fro"] == pytest.approx(err, rel=1e-9)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such calibration file"),
    (b"", "the calibration file is empty"),
    (b"\x00\x01\x02binary", "not text"),
    (b"\xff\xfe broken", "not UTF-8"),
    (b"too short", "fewer than one sample"),
])
def test_cli_bad_calibration_input(tiny_llama_tok: Path, tmp_path: Path, capsys, content: bytes | None,
                                   message: str) -> None:
    text = tmp_path / "calib.txt"
    if content is not None:
        text.write_bytes(content)
    result = run_cli(capsys, "quantize", tiny_llama_tok, "-o", tmp_path / "out", "-q", *CALIB, "--calibration", text,
                     "--method", "int4")
    assert result.rc == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["calib.txt"] if content is not None else [])


@pytest.mark.parametrize("algorithm", ["gptq", "optimize"])
def test_merge_quantize_with_algorithm_equals_quantizing_the_float_merge(tiny_llama_tok: Path, tmp_path: Path,
                                                                         capsys, algorithm: str) -> None:
    """`merge --quantize --algorithm` on a float base = merging in float, then `quantize --algorithm` (same bytes)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_tok)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    calib = CALIB[2:] if algorithm == "gptq" else ()
    quant = ("--quantize", "int4", "--group-size", "32", "--algorithm", algorithm, *calib)
    r = run_cli(capsys, "merge", tiny_llama_tok, "--adapter", tmp_path / "adapter", "-o", tmp_path / "direct", "-q",
                *quant)
    assert r.rc == 0, r.err
    assert run_cli(capsys, "merge", tiny_llama_tok, "--adapter", tmp_path / "adapter", "-o", tmp_path / "float",
                   "-q").rc == 0
    gptq_cli_args = ("--method", "int4", "--group-size", "32", "--algorithm", algorithm, *calib)
    assert run_cli(capsys, "quantize", tmp_path / "float", "-o", tmp_path / "two-step", "-q", *gptq_cli_args).rc == 0
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == \
        (tmp_path / "two-step" / "model.safetensors").read_bytes()
    report = json.loads((tmp_path / "direct" / "report.json").read_text())
    assert report["quantization"]["parameters"]["algorithm"] == algorithm
    assert len(report["merge"]["tensors"]) == 6  # the merge report still lists every merged tensor

    # a quantized base cannot take it: its merged weights would be re-rounded, not quantized once
    assert run_cli(capsys, "quantize", tiny_llama_tok, "-o", tmp_path / "q", "-q", "--method", "int4",
                   "--group-size", "32").rc == 0
    r = run_cli(capsys, "merge", tmp_path / "q", "--adapter", tmp_path / "adapter", "-o", tmp_path / "bad", *quant)
    assert r.rc == 2 and "applies when BASE is a float checkpoint" in r.err and not (tmp_path / "bad").exists()


def test_gptq_outputs_load_in_transformers(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    """NF4 (transformers + bitsandbytes) and symmetric compressed-tensors outputs of GPTQ load in transformers, and
    the loaders reconstruct exactly the weights our reader (and the report) see."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    nf4 = gptq_cli(capsys, tiny_llama_tok, tmp_path / "nf4", "--method", "nf4", "--block-size", "64")
    with open_model(nf4) as reader:
        ours = {i.name: reader.get(i.name) for i in reader.infos() if reader.is_quantized(i.name)}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(nf4)).eval()
    modules = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert {n + ".weight" for n in modules} == set(ours) and len(ours) == 14
    for name, module in modules.items():
        assert torch.equal(bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state), ours[name + ".weight"])

    pytest.importorskip("compressed_tensors")
    ct = gptq_cli(capsys, tiny_llama_tok, tmp_path / "ct", "--method", "int4", "--format", "compressed-tensors",
                  "--sym", "--group-size", "32")
    with open_model(ct) as reader:
        ours = {i.name: reader.get(i.name) for i in reader.infos() if reader.is_quantized(i.name)}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ct)).eval()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.int64))  # compressed-tensors decompresses on the first forward
    for name, W in ours.items():
        assert torch.equal(model.get_submodule(name.removesuffix(".weight")).weight, W), name


def test_act_order_groups_in_the_gptq_layout(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    """--act-order into the gptq layout: groups follow GPTQ's order (desc_act, a g_idx per channel); the stored
    tensors decode by the published formula W = s[g_idx] (q - z[g_idx]) to what our reader (and report) give;
    other layouts keep contiguous groups."""
    import numpy as np
    from safetensors.numpy import load_file as load_numpy

    out = gptq_cli(capsys, tiny_llama_tok, tmp_path / "ao", "--method", "int4", "--group-size", "32", "--act-order")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["group_size"] == 32
    stored = load_numpy(out / "model.safetensors")
    report = {r["name"]: r for r in json.loads((out / "report.json").read_text())["quantized"]}
    permuted = 0
    with open_model(out) as reader:
        for key in [k for k in stored if k.endswith(".g_idx")]:
            p = key.removesuffix(".g_idx")
            g = stored[key].astype(np.int64)
            in_f = g.size
            assert np.bincount(g, minlength=-(-in_f // 32)).max() <= 32  # at most G channels per group
            permuted += not np.array_equal(g, np.arange(in_f) // 32)
            q = ((stored[p + ".qweight"].astype(np.int64)[..., None] >> (4 * np.arange(8))) & 0xF)
            q = q.transpose(0, 2, 1).reshape(in_f, -1)  # [in, out]
            z = ((stored[p + ".qzeros"].astype(np.int64)[..., None] >> (4 * np.arange(8))) & 0xF).reshape(
                stored[p + ".qzeros"].shape[0], -1)
            s = stored[p + ".scales"].astype(np.float32)
            decoded = (s[g] * (q - z[g]).astype(np.float32)).T
            np.testing.assert_array_equal(reader.get(p + ".weight").numpy(), decoded)
            assert report[p + ".weight"]["output_error"] <= report[p + ".weight"]["rtn_output_error"]
    assert permuted >= 12  # GPTQ won nearly everywhere, and its groups are act-order groups
    ct = gptq_cli(capsys, tiny_llama_tok, tmp_path / "ct", "--method", "int4", "--format", "compressed-tensors",
                  "--sym", "--group-size", "32", "--act-order")
    assert "g_idx" not in " ".join(load_numpy(ct / "model.safetensors"))
