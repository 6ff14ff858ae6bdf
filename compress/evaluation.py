"""`compress eval`: what compression cost on real text.

- Causal LMs: perplexity on a text in windows of ``window`` tokens moved by ``stride`` (default:
  non-overlapping). With an overlap, only the tokens past the overlap are scored, each with the
  full window of context before it (the "sliding window" evaluation of the transformers docs).
- Encoders: mean-pooled sentence embeddings of fixed real sentences, cosine against the first model.

Models are loaded through the real engine loader where one applies and is installed
(transformers + bitsandbytes for bnb outputs, llama.cpp through llama-cpp-python for ``.gguf``
files of causal LMs), else rebuilt from their config and filled with the float weights
``compress`` reads (dequantized tensor by tensor). The default text is the Python
Language Reference prose that ships with CPython (``pydoc_data/topics.py``), so it works offline.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError, OptionError
from compress.formats.inputs import open_checkpoint, open_model
from compress.formats.output import OutputFolder, check_output, write_json
from compress.formats.quantized import format_of, model_dtype


def require_transformers() -> Any:
    if importlib.util.find_spec("transformers") is None:
        raise OptionError("`compress eval` needs transformers, which is not installed",
                          fix="pip install 'compress[eval]' (or pip install transformers accelerate).")
    import transformers

    return transformers


def default_text() -> str:
    """The Python Language Reference prose shipped with CPython (topics in sorted order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def default_sentences(n: int = 12) -> list[str]:
    """The first sentence of ``n`` Language Reference topics: real, fixed, offline."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        first = " ".join(topics[key].split())
        first = first.split(". ")[0][:300]
        if len(first.split()) >= 6:
            out.append(first)
        if len(out) == n:
            break
    return out


@dataclass
class LoadedModel:
    model: Any
    how: str  # which loader was used
    tokenizer_dir: Path | None  # a folder holding tokenizer files, if the checkpoint ships one
    size_bytes: int  # weight bytes on disk


def _weight_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf")]
    return sum(p.stat().st_size for p in files)


def _tokenizer_dir(path: Path, keep: list[Any]) -> Path | None:
    if path.is_dir() and any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return path
    with open_checkpoint(path) as reader:
        files = reader.extra_files()
    if not any(n.startswith("tokenizer") for n in files):
        return None
    tmp = tempfile.TemporaryDirectory(prefix="compress-tok-")
    keep.append(tmp)  # lives as long as the caller keeps the list
    for name, source in files.items():
        (Path(tmp.name) / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    return Path(tmp.name)


class LlamaCppLM:
    """A GGUF causal LM run by llama.cpp (llama-cpp-python): ``window_logits(ids)`` gives the float32
    logits [n, vocab] of a window of token ids evaluated from an empty context (no BOS added), as
    :func:`perplexity` needs. The context is (re)created as large as the largest window seen."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = path
        self.threads = threads or max(1, min(torch.get_num_threads(), 8))
        self._llm: Any = None
        self._ctx = 0

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        import llama_cpp

        n = int(ids.numel())
        if self._llm is None or n > self._ctx:
            self.close()
            self._ctx = max(n, 512)
            self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self._ctx, n_batch=min(self._ctx, 512),
                                        logits_all=True, n_threads=self.threads, verbose=False)
        self._llm.reset()
        self._llm.eval([int(t) for t in ids.tolist()])
        return torch.from_numpy(self._llm.scores[:n].copy()).float()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __del__(self) -> None:
        self.close()


def load_model(path: Path, *, encoder: bool, device: torch.device, keep: list[Any]) -> LoadedModel:
    """Load any checkpoint compress reads into a transformers model (see module docstring)."""
    transformers = require_transformers()
    auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    with open_checkpoint(path) as raw:
        fmt = format_of(raw)
    tok_dir = _tokenizer_dir(path, keep)
    size = _weight_bytes(path)
    if path.suffix == ".gguf" and not encoder and importlib.util.find_spec("llama_cpp"):
        return LoadedModel(LlamaCppLM(path), "llama.cpp (llama-cpp-python)", tok_dir, size)
    if fmt is not None and fmt.name == "bnb" and importlib.util.find_spec("bitsandbytes") and path.is_dir():
        model = auto.from_pretrained(path, device_map=str(device))
        return LoadedModel(model.eval(), "transformers + bitsandbytes", tok_dir, size)
    with open_model(path) as reader:
        model = transformers_model(reader, encoder=encoder)
    how = f"dequantized by compress ({fmt.name})" if fmt is not None else "float weights read by compress"
    return LoadedModel(model.to(device).eval(), how, tok_dir, size)


def transformers_model(reader: Any, *, encoder: bool = False, dtype: torch.dtype | None = None) -> Any:
    """A transformers model built from ``reader``'s config.json (``AutoModel`` / ``AutoModelForCausalLM``) holding
    the weights compress reads from it (quantized layouts dequantized), in ``dtype`` (default: the config's,
    else float32); in eval mode, on the CPU. Every weight the model has must be in the checkpoint."""
    transformers = require_transformers()
    auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    where = str(reader.path)
    if not reader.config:
        raise InputError("no config.json: cannot tell which architecture to build", where=where,
                         fix="Evaluate a checkpoint folder with its config.json.")
    config_dict = {k: v for k, v in reader.config.items() if k != "quantization_config"}
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise InputError("config.json has no model_type", where=where, fix="Add the model_type field.")
    config = transformers.AutoConfig.for_model(model_type, **config_dict)
    model = auto.from_config(config, dtype=dtype or model_dtype(reader.config, torch.float32))  # then overwritten
    state = {info.name: reader.get(info.name) for info in reader.infos()}
    prefix = getattr(model, "base_model_prefix", "")
    own = set(model.state_dict())
    if encoder and prefix and not (set(state) & own):  # e.g. 'bert.' prefixed names into a bare BertModel
        state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
    missing = own - set(state)
    if getattr(config, "tie_word_embeddings", False):
        missing -= {"lm_head.weight"}
    missing = {m for m in missing if not m.endswith(("position_ids", "inv_freq"))}
    if missing:
        raise InputError(f"the checkpoint lacks {len(missing)} weights the model needs (e.g. '{sorted(missing)[0]}')",
                         where=where, fix="Check that config.json describes these weights.")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def mean_token_loss(model: Any, blocks: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) of a causal LM over every predicted token of ``blocks`` [n, L]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        x = blocks[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return total / count


@torch.no_grad()
def block_logits(model: Any, blocks: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """float32 logits [n, L, vocab] of a causal LM on token ``blocks`` [n, L]."""
    model.eval()
    return torch.cat([model(input_ids=blocks[i:i + batch]).logits.float() for i in range(0, blocks.shape[0], batch)])


def perplexity(model: Any, ids: torch.Tensor, *, window: int, stride: int,
               progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """exp(mean NLL) of ids [n] under a causal LM; returns (perplexity, tokens scored)."""
    n = ids.numel()
    nll, scored = 0.0, 0
    prev_end = 0
    engine = isinstance(model, LlamaCppLM)
    device = torch.device("cpu") if engine else next(model.parameters()).device
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        chunk = ids[begin:end].to(device)
        new = end - prev_end  # tokens not scored by an earlier window
        if engine:
            logits = model.window_logits(chunk)
        else:
            with torch.no_grad():
                logits = model(chunk[None]).logits[0].float()
        targets = chunk[1:]
        losses = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
        count = min(new, losses.numel())
        nll += float(losses[-count:].double().sum())
        scored += count
        prev_end = end
        if progress:
            progress(end - begin)
        if end == n:
            break
    return math.exp(nll / scored), scored


def sentence_embeddings(model: Any, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden states [n, dim] (the sentence-transformers pooling of MiniLM)."""
    device = next(model.parameters()).device
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@dataclass(frozen=True)
class EvalRequest:
    """`compress eval`: score ``models`` side by side (perplexity, or embedding cosine with ``embeddings``)."""

    models: tuple[Path, ...]
    text: Path | None = None
    tokens: int = 20000
    window: int = 1024
    stride: int | None = None
    embeddings: bool = False
    out: Path | None = None
    force: bool = False

    def check(self) -> None:
        stride = self.stride or self.window
        if self.window < 2 or self.tokens < 2 or not 1 <= stride <= self.window:
            raise OptionError(f"need --window >= 2, --tokens >= 2 and 1 <= --stride <= --window (got {self.window}, "
                              f"{self.tokens}, {stride})", fix="Pick sizes such as --window 1024 --tokens 20000.")
        if self.out is not None:
            check_output(self.out, force=self.force, inputs=list(self.models))
        for m in self.models:
            if not m.exists():
                raise InputError("no such file or folder", where=str(m), fix="Check the path.")

    def read_text(self) -> str:
        if self.text is None:
            return default_text()
        try:
            return self.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the text ({e})", where=str(self.text),
                             fix="Give a readable UTF-8 text file.") from e


def evaluate(request: EvalRequest, run: Any) -> dict[str, Any]:
    """Load each model in turn (one at a time), score it, and return the results (written to ``request.out``
    too, when given). ``run``: a :class:`~compress.pipeline.run.RunOptions` (device, progress)."""
    import gc

    transformers = require_transformers()
    request.check()
    stride = request.stride or request.window
    text = request.read_text()
    keep: list[Any] = []
    rows: list[dict[str, Any]] = []
    tokenizer = None
    reference: Any = None
    for path in request.models:
        loaded = load_model(path, encoder=request.embeddings, device=run.device, keep=keep)
        if tokenizer is None and loaded.tokenizer_dir is not None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
        if tokenizer is None:
            raise InputError("no tokenizer found", where=str(path),
                             fix="List first a model whose folder (or GGUF) carries its tokenizer.")
        row: dict[str, Any] = {"model": str(path), "loader": loaded.how, "size_bytes": loaded.size_bytes}
        if request.embeddings:
            sentences = default_sentences()
            emb = sentence_embeddings(loaded.model, tokenizer, sentences)
            if reference is None:
                reference = emb
            cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
            row.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()), sentences=len(sentences))
        else:
            ids = torch.tensor(tokenizer(text)["input_ids"][:request.tokens])
            if ids.numel() < 2:
                raise InputError("the text has fewer than 2 tokens", where=str(request.text or "default text"),
                                 fix="Give a longer text.")
            run.start(path.name, ids.numel(), 1)
            ppl, scored = perplexity(loaded.model, ids, window=request.window, stride=stride,
                                     progress=lambda n, name=path.name: run.advance(name, n))
            row.update(perplexity=ppl, tokens=scored)
        rows.append(row)
        del loaded
        gc.collect()
    metric = "mean_cosine" if request.embeddings else "perplexity"
    for row in rows:
        row["delta"] = row[metric] - rows[0][metric]
        row["delta_pct"] = 100 * row["delta"] / rows[0][metric] if rows[0][metric] else 0.0
    result = {"metric": metric, "window": request.window, "stride": stride, "tokens": request.tokens,
              "text": str(request.text) if request.text else "pydoc_data/topics.py (Python Language Reference)",
              "models": rows}
    if request.out is not None:
        _write_eval_report(request, result, run)
    return result


def _write_eval_report(request: EvalRequest, result: dict[str, Any], run: Any) -> None:
    from compress.pipeline.report import human_bytes
    from compress.pipeline.run import json_safe, write_provenance

    assert request.out is not None
    metric = result["metric"]
    lines = [f"# compress eval: {metric}", "", f"Text: {result['text']}; window {result['window']}, stride "
             f"{result['stride']}, up to {result['tokens']} tokens.", "",
             f"| model | loader | size | {metric} | Δ vs first |", "|---|---|---|---|---|"]
    for row in result["models"]:
        lines.append(f"| `{row['model']}` | {row['loader']} | {human_bytes(row['size_bytes'])} | {row[metric]:.4f} | "
                     f"{row['delta']:+.4f} ({row['delta_pct']:+.2f}%) |")
    with OutputFolder(request.out, force=request.force) as staging:
        write_json(staging.path / "report.json", json_safe(result))
        (staging.path / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_provenance(staging.path / "compress_provenance.json", run, "eval", request.models[0], request.out,
                         {"models": [str(m) for m in request.models]})
        staging.commit()
