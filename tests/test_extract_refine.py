"""extract-lora --refine-steps: the SVD factors refined end to end against the tuned model (KL on calibration text).

- Through the CLI on a tiny Llama whose fine-tune changed every Linear and the norm weights: the refined adapter
  lowers the held-out KL; PEFT, loading the adapter as written, gives exactly the KL the report states before (the
  SVD adapter) and after (the refined one) on the held-out samples recomputed here, so the model refined is the model
  PEFT runs (norms kept whole included); the weight errors of the report are recomputed from the written factors;
  runs are byte-identical; a learning rate that raises the KL keeps the SVD factors, byte for byte.
- The math alone (compress.lowrank.refine): the KL and the update of each factor kind against their definitions.
- Bad input: no calibration text, a step count below 1, a model that is not a causal LM, too little memory: one line,
  exit 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import heldout_tokens, run_cli
from safetensors.torch import load_file, save_file

from compress.lowrank.refine import Factors, RefineOptions, token_kl

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread", "narrow_err_console")
P = "base_model.model."
CALIB = ("--calibration", "default", "--calibration-samples", "16", "--calibration-length", "48")


# --- the math ------------------------------------------------------------------------------------------------


def test_token_kl_is_the_mean_kl_per_token() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    p, q = teacher.softmax(-1).double(), student.softmax(-1).double()
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(token_kl(student, teacher.log_softmax(-1))) == pytest.approx(expected, rel=1e-5)
    assert float(token_kl(teacher, teacher.log_softmax(-1))) == pytest.approx(0.0, abs=1e-6)


def test_factor_updates_follow_their_definitions() -> None:
    g = torch.Generator().manual_seed(1)
    A, B, x = torch.randn(3, 8, generator=g), torch.randn(5, 3, generator=g), torch.randn(4, 32, generator=g)
    pooled = Factors(A, B, group=4, pooling=0.25)  # A over 32 / 4 pooled inputs
    dense = (B @ A).repeat_interleave(4, dim=1) * 0.25  # the update QA-LoRA folds: constant inside each group
    torch.testing.assert_close(pooled.update(x, A, B), x @ dense.T, rtol=1e-5, atol=1e-6)
    A2 = torch.randn(3, 32, generator=g)
    torch.testing.assert_close(Factors(A2, B).update(x, A2, B), x @ (B @ A2).T, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[0, 5, 31]])
    emb = Factors(A2, B, embedding=True)  # PEFT's embedding update: the rows of (B A)^T looked up by id
    torch.testing.assert_close(emb.update(ids, A2, B), (B @ A2).T[ids], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "words"), [({"steps": 0}, "at least 1"), ({"steps": 3, "lr": -1.0}, "positive"),
                                              ({"steps": 3, "holdout": 1.0}, "(0, 1)")])
def test_bad_refine_options(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        RefineOptions(**kwargs)
    assert RefineOptions(16).split(16) == (14, 2) and RefineOptions(16).split(3) == (2, 1)


# --- through the CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tiny_llama_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TUNED = the tiny Llama + a dense change in every Linear of the blocks (not low rank: rank 2 leaves much to
    refine) and changed RMSNorm weights (kept whole in modules_to_save)."""
    folder = tmp_path_factory.mktemp("refine") / "tuned"
    shutil.copytree(tiny_llama_tok, folder)
    tensors = load_file(str(tiny_llama_tok / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            tensors[name] = w + 0.05 * torch.randn(w.shape, generator=g)
        elif name.endswith("layernorm.weight"):
            tensors[name] = w * (1 + 0.2 * torch.randn(w.shape, generator=g))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def extract(capsys, base: Path, tuned: Path, out: Path, *args: object) -> dict:
    r = run_cli(capsys, "extract-lora", "--base", base, "--tuned", tuned, "-o", out, "-q", "--rank", "2", *args)
    assert r.rc == 0, r.err
    return json.loads((out / "report.json").read_text())


@torch.no_grad()
def peft_kl(base: Path, tuned: Path, adapter: Path, tokens: torch.Tensor) -> float:
    """KL(tuned || base + adapter) per token on ``tokens``, the adapter loaded by PEFT."""
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    student = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    return float(token_kl(student(input_ids=tokens).logits, teacher(input_ids=tokens).logits.float().log_softmax(-1)))


@pytest.fixture(scope="module")
def runs(tiny_llama_tok: Path, tuned: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from compress import cli

    root = tmp_path_factory.mktemp("refined")
    folders = {"svd": root / "svd", "refined": root / "refined", "again": root / "again"}
    for label, out in folders.items():
        extra = [] if label == "svd" else ["--refine-steps", "12", "--refine-lr", "3e-3"]
        argv = ["extract-lora", "--base", tiny_llama_tok, "--tuned", tuned, "-o", out, "-q", "--rank", "2", *CALIB,
                *extra]
        assert cli.main([str(a) for a in argv]) == 0
    return folders


def test_refinement_lowers_the_kl_that_peft_measures(tiny_llama_tok: Path, tuned: Path, runs: dict[str, Path]) -> None:
    report = json.loads((runs["refined"] / "report.json").read_text())
    refinement = report["refinement"]
    assert refinement["kept"] is True and refinement["steps"] == 12
    assert (refinement["train_samples"], refinement["heldout_samples"]) == (14, 2)
    assert refinement["heldout_kl_after"] < 0.9 * refinement["heldout_kl_before"]
    assert report["rule"]["refine"] == "12 steps, lr 0.003"
    held = heldout_tokens(tiny_llama_tok)
    # PEFT loads both adapters; its KL on the held-out samples is the one refinement measured (same model)
    assert peft_kl(tiny_llama_tok, tuned, runs["svd"], held) == pytest.approx(refinement["heldout_kl_before"],
                                                                               rel=1e-3)
    assert peft_kl(tiny_llama_tok, tuned, runs["refined"], held) == pytest.approx(refinement["heldout_kl_after"],
                                                                                  rel=1e-3)
    config = json.loads((runs["refined"] / "adapter_config.json").read_text())
    assert config["modules_to_save"], "the changed norms are kept whole"
    provenance = json.loads((runs["refined"] / "compress_provenance.json").read_text())
    assert provenance["refinement"]["kept"] is True and provenance["refinement"]["lr"] == 3e-3


def test_report_weight_errors_are_of_the_refined_factors(tiny_llama_tok: Path, tuned: Path,
                                                         runs: dict[str, Path]) -> None:
    base, changed = load_file(str(tiny_llama_tok / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    factors = load_file(str(runs["refined"] / "adapter_model.safetensors"))
    svd = load_file(str(runs["svd"] / "adapter_model.safetensors"))
    report = json.loads((runs["refined"] / "report.json").read_text())
    rows = {r["module"]: r for r in report["modules"] if r["kind"] == "lora"}
    assert len(rows) == 14
    moved = 0
    for module, row in rows.items():
        A, B = factors[f"{P}{module}.lora_A.weight"], factors[f"{P}{module}.lora_B.weight"]
        dW = changed[module + ".weight"] - base[module + ".weight"]
        assert row["rel_error"] == pytest.approx(float((dW - B @ A).norm() / dW.norm()), rel=1e-4)
        assert "output_error" not in row  # the SVD's output errors no longer describe these factors
        moved += not torch.equal(A, svd[f"{P}{module}.lora_A.weight"])
    assert moved == len(rows)


def test_refinement_is_deterministic(runs: dict[str, Path]) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (runs["refined"] / name).read_bytes() == (runs["again"] / name).read_bytes()


def test_a_refinement_that_raises_the_kl_keeps_the_svd_factors(tiny_llama_tok: Path, tuned: Path, runs: dict,
                                                                tmp_path: Path, capsys) -> None:
    report = extract(capsys, tiny_llama_tok, tuned, tmp_path / "a", *CALIB, "--refine-steps", "3", "--refine-lr", "3")
    assert report["refinement"]["kept"] is False
    assert report["refinement"]["heldout_kl_after"] >= report["refinement"]["heldout_kl_before"]
    assert any("SVD factors were kept" in n for n in report["notes"])
    name = "adapter_model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (runs["svd"] / name).read_bytes()


def bad(capsys, base: Path, tuned: Path, tmp_path: Path, *args: object) -> str:
    out = tmp_path / "adapter"
    r = run_cli(capsys, "extract-lora", "--base", base, "--tuned", tuned, "-o", out, *args)
    assert r.rc == 2, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert not out.exists() and not list(tmp_path.glob(".*adapter*"))
    return r.err


def test_refine_needs_calibration_text(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys) -> None:
    assert "needs --calibration" in bad(capsys, tiny_llama_tok, tuned, tmp_path, "--refine-steps", "5")
    assert "at least 1" in bad(capsys, tiny_llama_tok, tuned, tmp_path, *CALIB, "--refine-steps", "-2")


def test_refine_needs_a_causal_lm(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((tiny_llama_tok / "config.json").read_text())
    folders = []
    for source in (tiny_llama_tok, tuned):
        folder = tmp_path / f"encoder-{source.name}"
        shutil.copytree(source, folder)
        (folder / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaModel"]}))
        folders.append(folder)
    assert "not a causal LM" in bad(capsys, *folders, tmp_path, *CALIB, "--refine-steps", "2")


def test_refine_says_when_memory_is_short(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.pipeline import extract_refine

    monkeypatch.setattr(extract_refine, "available_memory", lambda: 1 << 20)
    err = bad(capsys, tiny_llama_tok, tuned, tmp_path, *CALIB, "--refine-steps", "2")
    assert "only 1.0 MB of memory is available" in err or "of memory is available" in err


def test_dry_run_says_the_refinement_and_its_memory(tiny_llama_tok: Path, tuned: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "adapter"
    r = run_cli(capsys, "extract-lora", "--base", tiny_llama_tok, "--tuned", tuned, "-o", out, "--dry-run", *CALIB,
                "--refine-steps", "7")
    assert r.rc == 0, r.err
    with open(tiny_llama_tok / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    params = sum(int(torch.tensor(v["shape"]).prod()) for k, v in header.items() if k != "__metadata__")
    text = " ".join(r.out.split())
    assert "then 7 Adam steps (lr 0.0002) refine every factor" in text
    from compress.pipeline.report import human_bytes

    assert f"(about {human_bytes(int(4 * 2.5 * params))})" in text
    assert not out.exists()
