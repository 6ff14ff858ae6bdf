"""extract-lora beyond plain SVD: activation-aware factors (``--calibration``) and one size for the whole adapter
(``--budget`` / ``--mean-rank``).

- The math (compress.lowrank.svd): the whitened factors minimise the output error on the inputs (below plain SVD's
  at every rank, equal to the Eckart-Young bound of dW L), reduce to plain SVD when the inputs are white; the error
  curves equal the errors of the truncated products; the allocation spends at most the budget, gives every module
  rank 1 first and then follows the singular values' gain per parameter.
- Through the CLI on a tiny Llama with a real tokenizer: the report's output errors are recomputed here from the
  calibration runner's own statistics, the whitened adapter's output errors beat the plain one's, budgeted ranks
  vary and their sizes add up, PEFT loads the adapter with its rank_pattern and reproduces base + B A, the bytes
  are identical across runs and executors, and bad budgets end with one line, exit 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from compress.lowrank.svd import (
    RankRule,
    allocate_ranks,
    error_curves,
    low_rank,
    low_rank_whitened,
    whitening_factor,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
P = "base_model.model."


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A delta with a planted rank-16 part plus noise [96, 128], and correlated inputs X [2048, 128]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128))
    X[:, :5] *= 10
    dW = (torch.randn(96, 16, generator=g) @ torch.randn(16, 128, generator=g) * 0.1
          + torch.randn(96, 128, generator=g) * 0.05)
    return dW, X


def output_rel(dW: torch.Tensor, approx: torch.Tensor, X: torch.Tensor) -> float:
    return float(((dW - approx).double() @ X.double().T).norm() / (dW.double() @ X.double().T).norm())


@pytest.mark.parametrize("rank", [2, 8, 16, 40])
def test_whitened_factors_minimise_the_output_error(rank: int) -> None:
    dW, X = problem()
    S = X.T @ X / X.shape[0]
    L = whitening_factor(S, damp=1e-6)
    plain = low_rank(dW, RankRule(rank=rank), engine="exact")
    white = low_rank_whitened(dW, L, RankRule(rank=rank), engine="exact")
    ours = output_rel(dW, white.B @ white.A, X)
    assert ours < output_rel(dW, plain.B @ plain.A, X)
    assert ours == pytest.approx(white.eckart_young_rel_error, rel=1e-3)  # the bound in the output space
    # the best rank-r output error, independently: SVD of X dW^T (float64)
    s = torch.linalg.svdvals(X.double() @ dW.double().T)
    assert ours == pytest.approx(float((s[rank:] ** 2).sum() / (s**2).sum()) ** 0.5, rel=1e-3)


def test_white_inputs_give_plain_svd() -> None:
    dW, _ = problem()
    white = low_rank_whitened(dW, whitening_factor(torch.eye(128) * 4.0, damp=1e-6), RankRule(rank=8), engine="exact")
    plain = low_rank(dW, RankRule(rank=8), engine="exact")
    assert torch.allclose(white.B @ white.A, plain.B @ plain.A, atol=1e-5)


def test_error_curves_are_the_truncated_errors() -> None:
    dW, X = problem(1)
    S = X.T @ X / X.shape[0]
    for lr, s in ((low_rank_whitened(dW, whitening_factor(S), RankRule(rank=24), engine="exact"), S),
                  (low_rank(dW, RankRule(rank=24), engine="randomized"), S)):
        weight, output = error_curves(dW, lr, s)
        assert output is not None and len(weight) == len(output) == 24
        for r in (1, 7, 24):
            approx = lr.B[:, :r] @ lr.A[:r]
            assert weight[r - 1] == pytest.approx(float((dW - approx).norm() / dW.norm()), rel=1e-4)
            assert output[r - 1] == pytest.approx(output_rel(dW, approx, X), rel=1e-3)


def test_allocation() -> None:
    spectra = {"a": torch.tensor([5.0, 4, 3, 1]), "b": torch.tensor([10.0, 1, 0.5]), "c": torch.tensor([2.0, 1.9])}
    costs = {"a": 10, "b": 20, "c": 30}
    caps = {"a": 4, "b": 3, "c": 2}
    assert allocate_ranks(spectra, costs, 60, caps) == {"a": 1, "b": 1, "c": 1}  # the floor exactly
    # gains per parameter: a 1.6, 0.9, 0.1; b 0.05, 0.0125; c 0.12. With 30 left: a2 and a3 take 20, c2 (30)
    # no longer fits, a4 (10) does; with 60 left c2 fits before a4.
    assert allocate_ranks(spectra, costs, 90, caps) == {"a": 4, "b": 1, "c": 1}
    assert allocate_ranks(spectra, costs, 110, caps) == {"a": 3, "b": 1, "c": 2}
    assert allocate_ranks(spectra, costs, 120, caps) == {"a": 4, "b": 1, "c": 2}
    assert allocate_ranks(spectra, costs, 10_000, caps) == caps  # never above the caps
    with pytest.raises(ValueError, match="below rank 1 everywhere"):
        allocate_ranks(spectra, costs, 59, caps)
    g = torch.Generator().manual_seed(3)
    many = {f"m{i}": torch.sort(torch.rand(20, generator=g), descending=True).values for i in range(12)}
    cost = {m: 10 + 7 * i for i, m in enumerate(many)}
    ranks = allocate_ranks(many, cost, 2000, {m: 20 for m in many})
    assert sum(cost[m] * r for m, r in ranks.items()) <= 2000 and min(ranks.values()) >= 1


# --- through the CLI --------------------------------------------------------------------------------------------

CALIB = ("--calibration", "default", "--calibration-samples", "4", "--calibration-length", "32")


@pytest.fixture(scope="module")
def tuned(tiny_llama_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TUNED = the tiny Llama + a rank-8 change plus full-rank noise in every Linear of the blocks."""
    folder = tmp_path_factory.mktemp("tuned") / "tuned"
    shutil.copytree(tiny_llama_tok, folder)
    tensors = load_file(str(tiny_llama_tok / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            low = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1], generator=g)
            tensors[name] = w + 0.002 * low + 0.002 * torch.randn(w.shape, generator=g)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def extract(capsys, base: Path, tuned: Path, out: Path, *args: str) -> dict:
    r = run_cli(capsys, "extract-lora", "--base", base, "--tuned", tuned, "-o", out, "-q", *args)
    assert r.rc == 0, r.err
    return json.loads((out / "report.json").read_text())


def products(folder: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(folder / "adapter_model.safetensors"))
    return {k.removeprefix(P).removesuffix(".lora_A.weight"): t[k.replace("lora_A", "lora_B")].double() @ t[k].double()
            for k in t if k.endswith("lora_A.weight")}


def test_calibrated_extraction_lowers_the_output_error(tiny_llama_tok: Path, tuned: Path, tmp_path: Path,
                                                      capsys) -> None:
    plain = extract(capsys, tiny_llama_tok, tuned, tmp_path / "plain", "--rank", "4")
    calib = extract(capsys, tiny_llama_tok, tuned, tmp_path / "calib", "--rank", "4", *CALIB, "--aware", "whitened")
    diag = extract(capsys, tiny_llama_tok, tuned, tmp_path / "diag", "--rank", "4", *CALIB)
    assert "output_error" not in plain["modules"][0]
    assert calib["rule"]["calibration"] == "activation-aware (whitened)"
    assert diag["rule"]["calibration"] == "activation-aware (diagonal)"
    provenance = json.loads((tmp_path / "calib" / "compress_provenance.json").read_text())
    assert provenance["calibration"]["samples"] == 4 and provenance["calibration"]["length"] == 32

    # the statistics of the base model on the same samples, from the runner itself
    from compress.calib.importance import calibration_tokens
    from compress.calib.runner import CalibrationRunner
    from compress.calib.text import CalibrationOptions
    from compress.formats.inputs import open_model

    tokens, _ = calibration_tokens(tiny_llama_tok, CalibrationOptions("default", 4, 32, 0), [])
    S: dict[str, torch.Tensor] = {}
    with open_model(tiny_llama_tok) as reader:
        for block in CalibrationRunner(reader, tokens, torch.device("cpu")):
            S.update({n.removesuffix(".weight"): s.H.double() / s.rows for n, s in block.statistics().items()})
            block.finish({})
    base, tuned_t = load_file(str(tiny_llama_tok / "model.safetensors")), load_file(str(tuned / "model.safetensors"))

    def out_err(module: str, approx: torch.Tensor) -> float:
        dW = tuned_t[module + ".weight"].double() - base[module + ".weight"].double()
        E = dW - approx
        return float(((E @ S[module]) * E).sum() / ((dW @ S[module]) * dW).sum()) ** 0.5

    plain_products, calib_products = products(tmp_path / "plain"), products(tmp_path / "calib")
    rows = {m["module"]: m for m in calib["modules"]}
    assert len(rows) == 14
    better = 0
    for module, row in rows.items():
        assert row["output_error"] == pytest.approx(out_err(module, calib_products[module]), rel=1e-3)
        better += out_err(module, calib_products[module]) < out_err(module, plain_products[module])
    assert better == 14  # whitened: the least output error at its rank
    diag_products = products(tmp_path / "diag")
    for row in diag["modules"]:  # diagonal scaling: the report's output errors are the true ones too
        assert row["output_error"] == pytest.approx(out_err(row["module"], diag_products[row["module"]]), rel=1e-3)


def test_budget_allocates_ranks_and_peft_loads_them(tiny_llama_tok: Path, tuned: Path, tmp_path: Path,
                                                   capsys) -> None:
    out = tmp_path / "budget"
    report = extract(capsys, tiny_llama_tok, tuned, out, "--mean-rank", "4", *CALIB)
    again = extract(capsys, tiny_llama_tok, tuned, tmp_path / "again", "--mean-rank", "4", *CALIB, "--workers", "2")
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "again" / "adapter_model.safetensors").read_bytes()
    assert report == again
    rows = {m["module"]: m for m in report["modules"]}
    ranks = {m: r["rank"] for m, r in rows.items()}
    sizes = {m: sum(r["shape"]) for m, r in rows.items()}
    assert len(set(ranks.values())) > 1 and min(ranks.values()) >= 1
    spent = sum(sizes[m] * ranks[m] for m in rows)
    assert spent <= 4 * sum(sizes.values()) and spent == sum(r["params"] for r in rows.values())
    assert (out / "ranks.png").stat().st_size > 1000
    config = json.loads((out / "adapter_config.json").read_text())
    assert {m: config["rank_pattern"].get(m, config["r"]) for m in rows} == ranks

    import peft
    base_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_tok), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base_model, str(out)).merge_and_unload()
    base, prods = load_file(str(tiny_llama_tok / "model.safetensors")), products(out)
    state = merged.state_dict()
    for module in rows:
        expected = base[module + ".weight"].double() + prods[module]
        assert torch.allclose(state[module + ".weight"].double(), expected, atol=1e-6), module

    # --budget in bytes: the same allocation rule, at most that many bytes of factors
    sized = extract(capsys, tiny_llama_tok, tuned, tmp_path / "bytes", "--budget", "20KB")
    spent = sum(sum(m["shape"]) * m["rank"] for m in sized["modules"]) * 4
    assert spent <= 20_000 and sized["rule"]["budget"].startswith("budget")


@pytest.mark.parametrize(("args", "message"), [
    (("--budget", "1KB"), "the budget cannot give each of the 14 modules rank 1"),
    (("--budget", "lots"), "--budget 'lots' is not a size"),
    (("--mean-rank", "4", "--rank", "8"), "--budget / --mean-rank choose every rank"),
    (("--mean-rank", "0"), "--mean-rank must be at least 1"),
    (("--calibration", "missing.txt"), "no such calibration file"),
])
def test_bad_budget_and_calibration(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys,
                                    args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "out"
    r = run_cli(capsys, "extract-lora", "--base", tiny_llama_tok, "--tuned", tuned, "-o", out, *args)
    assert r.rc == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_calibration_text_too_short(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("def f(): pass\n", encoding="utf-8")
    out = tmp_path / "out"
    r = run_cli(capsys, "extract-lora", "--base", tiny_llama_tok, "--tuned", tuned, "-o", out, "--calibration", text)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "fewer than one sample of --calibration-length 512" in r.err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["short.txt"]


def test_dry_run_says_the_rule_in_words(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys) -> None:
    for args, words in ((("--rank", "8"), "under rank 8 (at most 256)"),
                        (("--mean-rank", "8"), "ranks allocated after the SVDs under mean rank 8, each at most 256")):
        r = run_cli(capsys, "extract-lora", "--base", tiny_llama_tok, "--tuned", tuned, "--dry-run", *args)
        assert r.rc == 0 and words in " ".join(r.out.split()) and "RankRule(" not in r.out, r.out
        # a summary by action and reason; every tensor only with --verbose
        assert "Linear weight │ 14 │" in " ".join(r.out.split()) and "q_proj" not in r.out
    r = run_cli(capsys, "extract-lora", "--base", tiny_llama_tok, "--tuned", tuned, "--dry-run", "--verbose")
    assert r.rc == 0 and "model.layers.1.self_attn.q_proj.weight" in " ".join(r.out.split())
    assert list(tmp_path.iterdir()) == []
