"""extract-lora in QA-LoRA form (``--quantized-base Q [--qalora-group-size G]``): an adapter whose lora_A sees the
inputs pooled over groups of G channels, extracted from TUNED minus the dequantized INT4 model Q, so that it folds
into Q's zero points with the codes and scales untouched.

- The math (compress.lowrank.svd): the grouped factors are the truncated SVD of the group means (checked against an
  independent float64 SVD), the whitened ones reach the least-squares optimum on the pooled inputs, and the error
  curves equal the errors of the expanded truncated products.
- Through the CLI on a tiny Llama and its INT4 g32 model: a planted group-constant change is recovered exactly;
  PEFT's own QA-LoRA forward (``QALoraLinearVariant.forward``) on the dequantized base gives the tuned model's
  outputs; ``compress merge Q --adapter A --quantize int4 --strategy fold --format native`` writes exactly the
  tuned weights with Q's codes and scales; the reported errors are recomputed here; a budget counts lora_A as
  [r, in/G]; and the bad inputs of the issue end with one line, exit 2 and nothing written.
- PEFT loading the adapter on the GPTQ checkpoint itself needs gptqmodel (tests/test_loaders.py -k gptqmodel,
  scripts/check_gptq_loader.sh).
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, heldout_tokens, run_cli
from safetensors.torch import load_file, save_file

from compress.formats.inputs import open_model
from compress.lowrank.svd import RankRule, grouped_error_curves, low_rank_grouped

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread", "narrow_err_console")
P = "base_model.model."
G = 32


def main(*argv: object) -> int:
    """``compress ARGV`` in-process, for module fixtures (no capsys there): the exit code."""
    from compress import cli

    return cli.main([str(a) for a in argv])


def expand(M: torch.Tensor, group: int = G) -> torch.Tensor:
    return M.repeat_interleave(group, dim=1)


# --- the math ----------------------------------------------------------------------------------------


def grouped_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    D = torch.randn(48, 128, generator=g)
    X = torch.randn(600, 128, generator=g) * torch.linspace(0.2, 3.0, 128)
    return D, X


@pytest.mark.parametrize("rank", [1, 3])
def test_grouped_factors_are_the_svd_of_the_group_means(rank: int) -> None:
    D, _ = grouped_problem()
    lr = low_rank_grouped(D, G, RankRule(rank=rank), engine="exact")
    means = D.double().reshape(48, 128 // G, G).mean(-1)
    U, s, Vh = torch.linalg.svd(means, full_matrices=False)
    best = (U[:, :rank] * s[:rank]) @ Vh[:rank]
    assert float((lr.B.double() @ lr.A.double() - best).norm() / best.norm()) < 1e-5
    # ||D - expand(M)||^2 = ||D - expand(means)||^2 + G ||means - M||^2: the weight error is the least possible
    error = float((D.double() - expand(best)).norm() / D.double().norm())
    assert lr.eckart_young_rel_error == pytest.approx(error, rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    B, A = lr.B.double(), lr.A.double()
    nearby = (B + 0.01 * torch.randn(B.shape, generator=gen, dtype=torch.float64)) @ (
        A + 0.01 * torch.randn(A.shape, generator=gen, dtype=torch.float64))
    for other in (best * 1.01, nearby):  # other rank-r updates do worse
        assert float((D.double() - expand(other)).norm() / D.double().norm()) > error


def test_whitened_grouped_factors_reach_the_pooled_least_squares() -> None:
    D, X = grouped_problem()
    S = X.T @ X / X.shape[0]
    lr = low_rank_grouped(D, G, RankRule(rank=4), S=S, aware="whitened", damp=1e-7, engine="exact")
    pooled = X.double().reshape(600, 128 // G, G).sum(-1)  # X P
    M_ls = torch.linalg.lstsq(pooled, X.double() @ D.double().T).solution.T
    assert float((lr.B.double() @ lr.A.double() - M_ls).norm() / M_ls.norm()) < 1e-4


@pytest.mark.parametrize("aware", [None, "diagonal", "whitened"])
def test_grouped_error_curves_are_the_expanded_errors(aware: str | None) -> None:
    D, X = grouped_problem()
    S = X.T @ X / X.shape[0]
    s = None if aware is None else S
    lr = low_rank_grouped(D, G, RankRule(rank=4), S=s, aware=aware or "diagonal", engine="exact")
    weight, output = grouped_error_curves(D, lr, G, s)
    for r in range(1, 5):
        E = (D - expand(lr.B[:, :r] @ lr.A[:r])).double()
        assert weight[r - 1] == pytest.approx(float(E.norm() / D.double().norm()), rel=1e-5)
        if aware is not None:
            assert output is not None
            expected = float((E @ X.double().T).norm() / (D.double() @ X.double().T).norm())
            assert output[r - 1] == pytest.approx(expected, rel=1e-4)


# --- through the CLI ----------------------------------------------------------------------------------


def targets_of(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t for n, t in load_file(str(folder / "model.safetensors")).items()
            if n.endswith("proj.weight") and ".layers." in n}


def dequantized(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    with open_model(folder) as reader:
        return {n: reader.get(n).float() for n in names}


@pytest.fixture(scope="module")
def models(tiny_llama_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """BASE (tiny Llama, inputs 64 and 128), Q = its INT4 g32 asymmetric GPTQ checkpoint, PLANTED = dequant(Q) plus a
    rank-2 group-constant change M (changes[name]) in every Linear of the blocks, DENSE = BASE plus a dense change."""
    root = tmp_path_factory.mktemp("qalora")
    q = root / "q"
    assert main("quantize", tiny_llama_tok, "-o", q, "--method", "int4", "--group-size", G, "--asym",
                "--format", "gptq", "-q") == 0
    base_tensors = load_file(str(tiny_llama_tok / "model.safetensors"))
    names = sorted(targets_of(tiny_llama_tok))
    deq = dequantized(q, names)
    g = torch.Generator().manual_seed(7)
    planted: dict[str, torch.Tensor] = {}
    planted_tensors, dense_tensors = dict(base_tensors), dict(base_tensors)
    for n in names:
        out, n_in = deq[n].shape
        planted[n] = (torch.randn(out, 2, generator=g) @ torch.randn(2, n_in // G, generator=g)) * 0.01
        planted_tensors[n] = deq[n] + expand(planted[n])
        dense_tensors[n] = base_tensors[n] + 0.003 * torch.randn(out, n_in, generator=g)
    folders = {}
    for label, tensors in (("planted", planted_tensors), ("dense", dense_tensors)):
        folders[label] = root / label
        shutil.copytree(tiny_llama_tok, folders[label])
        save_file(tensors, str(folders[label] / "model.safetensors"), metadata={"format": "pt"})
    return types.SimpleNamespace(base=tiny_llama_tok, q=q, names=names, deq=deq, changes=planted, root=root,
                                 **folders)


def extract(capsys, tuned: Path, out: Path, *args: object, base: Path, q: Path) -> dict:
    r = run_cli(capsys, "extract-lora", "--base", base, "--tuned", tuned, "-o", out, "-q", "--quantized-base", q, *args)
    assert r.rc == 0, r.err
    return json.loads((out / "report.json").read_text())


def adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return load_file(str(folder / "adapter_model.safetensors")), config


def fold(capsys, q: Path, adapter_folder: Path, merged: Path) -> Path:
    """``compress merge Q --adapter A --quantize int4 --strategy fold --format native`` into ``merged``."""
    r = run_cli(capsys, "merge", q, "--adapter", adapter_folder, "-o", merged, "--quantize", "int4", "--strategy",
                "fold", "--format", "native", "-q")
    assert r.rc == 0, r.err
    return merged


def peft_qalora_forward(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
    """PEFT's own QA-LoRA forward (peft.tuners.lora.variants.QALoraLinearVariant) on a layer whose base weight is
    W, with the adapter's factors: what PEFT computes for the adapter on a GPTQ layer holding W."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    lora_A = torch.nn.Linear(A.shape[1], A.shape[0], bias=False)
    lora_B = torch.nn.Linear(B.shape[1], B.shape[0], bias=False)
    lora_A.weight.data, lora_B.weight.data = A.float(), B.float()
    module = types.SimpleNamespace(lora_A={"default": lora_A}, lora_B={"default": lora_B},
                                   lora_dropout={"default": torch.nn.Identity()}, scaling={"default": 1.0},
                                   qalora_group_size={"default": group}, in_features=W.shape[1], training=False)
    with torch.no_grad():
        return QALoraLinearVariant.forward(module, active_adapter="default", x=x, result=x @ W.T)


def test_planted_change_is_recovered_and_folds_exactly(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    report = extract(capsys, models.planted, out, "--rank", "2", base=models.base, q=models.q)
    tensors, config = adapter(out)
    assert config["use_qalora"] is True and config["qalora_group_size"] == G and config["r"] == 2
    assert report["rule"]["qalora"].startswith(f"group size {G}")
    rows = {r["module"]: r for r in report["modules"]}
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    for n in models.names:
        module = n.removesuffix(".weight")
        A, B = tensors[f"{P}{module}.lora_A.weight"], tensors[f"{P}{module}.lora_B.weight"]
        n_in = models.deq[n].shape[1]
        assert tuple(A.shape) == (2, n_in // G)
        assert rows[module]["rel_error"] < 1e-5 and rows[module]["params"] == A.numel() + B.numel()
        # PEFT's QA-LoRA forward on the dequantized base is the planted (tuned) layer
        tuned_W = models.deq[n] + expand(models.changes[n])
        got = peft_qalora_forward(A, B, models.deq[n], x[:, :n_in], G)
        torch.testing.assert_close(got, x[:, :n_in] @ tuned_W.T, rtol=0, atol=2e-6)

    merged = fold(capsys, models.q, out, tmp_path / "merged")
    with open_model(models.q) as q_reader, open_model(merged) as m_reader:
        for n in models.names:
            before, after = q_reader.quantized(n), m_reader.quantized(n)
            assert torch.equal(before.codes, after.codes) and torch.equal(before.scales, after.scales), n
            ideal = models.deq[n] + expand(models.changes[n])
            assert float((after.dequantize(torch.float32) - ideal).abs().max()) < 1e-6 * float(ideal.abs().max()) * 10


def test_dense_change_factors_and_reported_errors(models, tmp_path: Path, capsys) -> None:
    """A dense fine-tune: the factors are the rank-1 SVD of the group means of TUNED - dequant(Q), and the report's
    weight error is ||R - expand(B A)|| / ||R||, recomputed here; PEFT's forward applies exactly expand(B A)."""
    out = tmp_path / "adapter"
    report = extract(capsys, models.dense, out, "--rank", "1", "--svd", "exact", base=models.base, q=models.q)
    tensors, _ = adapter(out)
    rows = {r["module"]: r for r in report["modules"]}
    tuned = targets_of(models.dense)
    for n in models.names:
        module = n.removesuffix(".weight")
        R = (tuned[n] - models.deq[n]).double()
        out_f, n_in = R.shape
        means = R.reshape(out_f, n_in // G, G).mean(-1)
        U, s, Vh = torch.linalg.svd(means, full_matrices=False)
        best = s[0] * torch.outer(U[:, 0], Vh[0])
        A, B = tensors[f"{P}{module}.lora_A.weight"], tensors[f"{P}{module}.lora_B.weight"]
        x = torch.eye(n_in)
        applied = (peft_qalora_forward(A, B, models.deq[n], x, G) - x @ models.deq[n].T).T.double()  # [out, in]
        assert float((applied - expand(best)).norm() / best.norm()) < 1e-4
        assert rows[module]["rel_error"] == pytest.approx(float((R - applied).norm() / R.norm()), rel=1e-4)


def test_budget_counts_the_pooled_lora_a(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    extract(capsys, models.dense, out, "--mean-rank", "1", base=models.base, q=models.q)
    tensors, config = adapter(out)
    shapes = {n: models.deq[n].shape for n in models.names}
    budget = sum(o + i // G for o, i in shapes.values())  # rank 1 everywhere at out + in/G parameters
    spent = sum(t.numel() for k, t in tensors.items() if "lora_" in k)
    assert spent <= budget and config["use_qalora"] is True


def test_calibrated_qalora_reports_output_errors(models, tmp_path: Path, capsys) -> None:
    """With --quantized-base, --calibration defaults to the whitened form: the least output error on the pooled
    inputs (below the diagonal scaling's on every module)."""
    calib = ("--calibration", "default", "--calibration-samples", "4", "--calibration-length", "32")
    white = extract(capsys, models.dense, tmp_path / "white", "--rank", "2", *calib, base=models.base, q=models.q)
    diag = extract(capsys, models.dense, tmp_path / "diag", "--rank", "2", *calib, "--aware", "diagonal",
                   base=models.base, q=models.q)
    assert white["rule"]["calibration"] == "activation-aware (whitened)"
    assert diag["rule"]["calibration"] == "activation-aware (diagonal)"
    by_module = {r["module"]: r["output_error"] for r in diag["modules"]}
    for row in white["modules"]:
        assert 0 < row["output_error"] <= by_module[row["module"]] * 1.001, row["module"]
    provenance = json.loads((tmp_path / "white" / "compress_provenance.json").read_text())
    assert provenance["quantized_base"]["qalora_group_size"] == G


def bad(capsys, models, tmp_path: Path, *args: object, words: tuple[str, ...], tuned: Path | None = None) -> None:
    out = tmp_path / "adapter"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli(capsys, "extract-lora", "--base", models.base, "--tuned", tuned or models.dense, "-o", out, *args)
    assert r.rc == 2, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture(scope="module")
def foreign_q(models) -> Path:
    """The INT4 g32 model of another tiny Llama of the same shapes."""
    other = build_tiny_llama(models.root / "other", hidden=64, intermediate=128, vocab=49152, seed=11)
    q = models.root / "other_q"
    assert main("quantize", other, "-o", q, "--method", "int4", "--group-size", G, "-q") == 0
    return q


@pytest.fixture(scope="module")
def nf4_q(models) -> Path:
    q = models.root / "nf4_q"
    assert main("quantize", models.base, "-o", q, "--method", "nf4", "-q") == 0
    return q


@pytest.mark.parametrize(("case", "words"), [
    ("group without base", ("--qalora-group-size needs --quantized-base",)),
    ("not a multiple", ("--qalora-group-size 16 is not a multiple of the quantized base's group size 32",)),
    ("does not divide", ("--qalora-group-size 96 does not divide the input size 64",)),
    ("foreign", ("not a quantization of --base",)),
    ("nf4", ("folds only into group-wise INT4",)),
    ("float", ("--quantized-base", "no group-wise INT4 weight")),
    ("embeddings lora", ("QA-LoRA adapters have Linear modules only",)),
])
def test_bad_quantized_base(models, foreign_q: Path, nf4_q: Path, tmp_path: Path, capsys, case: str,
                            words: tuple[str, ...]) -> None:
    args = {"group without base": ("--qalora-group-size", "32"),
            "not a multiple": ("--quantized-base", models.q, "--qalora-group-size", "16"),
            "does not divide": ("--quantized-base", models.q, "--qalora-group-size", "96"),
            "foreign": ("--quantized-base", foreign_q),
            "nf4": ("--quantized-base", nf4_q, "--qalora-group-size", "32"),
            "float": ("--quantized-base", models.base),
            "embeddings lora": ("--quantized-base", models.q, "--embeddings", "lora")}[case]
    bad(capsys, models, tmp_path, *args, words=words)


def test_refined_qalora_adapter_still_folds_exactly(models, tmp_path: Path, capsys) -> None:
    """--refine-steps on a QA-LoRA adapter: the refined model is the quantized base plus the pooled update (KL of the
    folded merge on the held-out samples = the KL refinement reports), and the fold leaves codes and scales alone."""
    from compress.evaluation import transformers_model
    from compress.lowrank.refine import token_kl

    out = tmp_path / "adapter"
    report = extract(capsys, models.dense, out, "--rank", "1", "--calibration", "default", "--calibration-samples",
                     "16", "--calibration-length", "48", "--refine-steps", "10", "--refine-lr", "1e-3",
                     base=models.base, q=models.q)
    refinement = report["refinement"]
    assert refinement["kept"] is True and refinement["heldout_kl_after"] < refinement["heldout_kl_before"]
    tensors, config = adapter(out)
    assert config["use_qalora"] is True
    merged = fold(capsys, models.q, out, tmp_path / "merged")
    with open_model(models.q) as q_reader, open_model(merged) as m_reader:
        for n in models.names:
            before, after = q_reader.quantized(n), m_reader.quantized(n)
            assert torch.equal(before.codes, after.codes) and torch.equal(before.scales, after.scales), n
            module = n.removesuffix(".weight")
            A, B = tensors[f"{P}{module}.lora_A.weight"], tensors[f"{P}{module}.lora_B.weight"]
            x = torch.eye(models.deq[n].shape[1])
            applied = (peft_qalora_forward(A, B, models.deq[n], x, G) - x @ models.deq[n].T).T
            torch.testing.assert_close(after.dequantize(torch.float32), models.deq[n] + applied, rtol=0, atol=1e-6)
        folded = transformers_model(m_reader, dtype=torch.float32)
    with open_model(models.dense) as reader:
        teacher = transformers_model(reader, dtype=torch.float32)
    held = heldout_tokens(models.base, 16, 48)
    with torch.no_grad():
        kl = float(token_kl(folded(input_ids=held).logits, teacher(input_ids=held).logits.float().log_softmax(-1)))
    assert kl == pytest.approx(refinement["heldout_kl_after"], rel=1e-3)
