"""`compress eval`: what compression cost on real text.

- Causal LMs: perplexity on a text in windows of ``window`` tokens moved by ``stride`` (default:
  non-overlapping). With an overlap, only the tokens past the overlap are scored, each with the
  full window of context before it (the "sliding window" evaluation of the transformers docs).
  Each model after the first is also compared with the first on the same scored tokens, as
  llama.cpp's ``llama-perplexity --kl-divergence`` does (tools/perplexity/perplexity.cpp): per token
  KL(P_first || P_model) = sum_v p_first(v) (log p_first(v) - log p_model(v)) over the vocabulary
  (``log_softmax(..., kl_divergence_result &)``), reported as mean ± standard error
  (``mean_and_uncertainty``: sqrt((mean(x^2) - mean^2) / (n - 1)), 0 up to 10 tokens), median (mean of
  the two middle values), 99th percentile (``percentile``: linear interpolation at 0.99 (n - 1)) and
  maximum; and top-1 agreement, llama.cpp's "Same top p": the share of tokens whose argmax next token is
  the first model's, with sqrt(p (1 - p) / (n - 1)). Unlike llama.cpp, which stores the base model's
  log-probs as 16-bit integers and drops those below -16, the log-probs here are exact (float64
  log-softmax of the float32 logits); and the tokens are this evaluation's windows, not the second half
  of BOS-prefixed chunks. See :func:`evaluate` for how memory stays bounded.
- Encoders: mean-pooled sentence embeddings of fixed real sentences, cosine against the first model.

Models are loaded through the real engine loader where one applies and is installed
(transformers + bitsandbytes for bnb outputs, llama.cpp through llama-cpp-python for ``.gguf``
files of causal LMs), else rebuilt from their config and filled with the float weights
``compress`` reads (dequantized tensor by tensor). The default text is the Python
Language Reference prose that ships with CPython (``pydoc_data/topics.py``), so it works offline.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import tempfile
import time
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


def default_sentences(n: int | None = 12) -> list[str]:
    """The first sentence of ``n`` Language Reference topics (None: of every topic whose first sentence has six
    words or more, 79 with CPython 3.11): real, fixed, offline."""
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


def tokenizer_dir(path: Path, keep: list[Any]) -> Path | None:
    """A folder holding the tokenizer files of ``path`` (the folder itself, or a temporary one with a GGUF's
    converted tokenizer, kept alive by ``keep``), or None when it has none."""
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
    tok_dir = tokenizer_dir(path, keep)
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


def _no_init_weights() -> Any:
    """transformers' own context that builds a model without initialising its weights (where it has one)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


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
    # Every weight is overwritten from the checkpoint below (a missing one is an error), so transformers' random
    # initialisation, seconds for a 135M model, is skipped.
    with _no_init_weights():
        model = auto.from_config(config, dtype=dtype or model_dtype(reader.config, torch.float32))
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


@dataclass(frozen=True)
class Window:
    """One forward pass of the perplexity evaluation: tokens ``ids[begin:end]``, of which the last ``count``
    are scored (predicted by the logits at positions ``end - count - 1 .. end - 2`` of the window)."""

    index: int
    begin: int
    end: int
    count: int


def windows(n: int, *, window: int, stride: int) -> list[Window]:
    """The windows over ``n`` tokens moved by ``stride``; each scores the tokens no earlier window scored."""
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        out.append(Window(len(out), begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return out


def window_logits(model: Any, chunk: torch.Tensor) -> torch.Tensor:
    """float32 logits [len, vocab] of a causal LM (transformers model or :class:`LlamaCppLM`) on ``chunk``."""
    if isinstance(model, LlamaCppLM):
        return model.window_logits(chunk.cpu())
    with torch.no_grad():
        return model(chunk.to(next(model.parameters()).device)[None]).logits[0].float()


def window_nll(logits: torch.Tensor, chunk: torch.Tensor, count: int) -> float:
    """Summed next-token NLL (nats, float64) of the last ``count`` tokens of ``chunk`` under its ``logits``."""
    losses = torch.nn.functional.cross_entropy(logits[:-1], chunk[1:].to(logits.device), reduction="none")
    return float(losses[-count:].double().sum())


def scored_rows(logits: torch.Tensor, w: Window) -> torch.Tensor:
    """The rows of a window's ``logits`` that predict its scored tokens [count, vocab]."""
    return logits[-w.count - 1:-1]


def perplexity(model: Any, ids: torch.Tensor, *, window: int, stride: int,
               progress: Callable[[int], None] | None = None,
               on_window: Callable[[Window, torch.Tensor], None] | None = None) -> tuple[float, int]:
    """exp(mean NLL) of ids [n] under a causal LM; returns (perplexity, tokens scored). ``on_window(w, logits)``
    sees each window's float32 logits after it is scored."""
    nll, scored = 0.0, 0
    for w in windows(ids.numel(), window=window, stride=stride):
        chunk = ids[w.begin:w.end]
        logits = window_logits(model, chunk)
        nll += window_nll(logits, chunk, w.count)
        scored += w.count
        if on_window is not None:
            on_window(w, logits)
        if progress:
            progress(w.end - w.begin)
    return math.exp(nll / scored), scored


# --- KL divergence against the first model (llama.cpp's `llama-perplexity --kl-divergence`) ----------------


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits [n, vocab]: KL(P_ref || P) = sum_v p_ref (log p_ref - log p) in nats (float64 log-softmax,
    ``rows`` rows at a time), and whether both distributions have the same most likely token (first on ties)."""
    kls = []
    for i in range(0, logits.shape[0], rows):
        log_p = torch.log_softmax(ref_logits[i:i + rows].double(), dim=-1)
        log_q = torch.log_softmax(logits[i:i + rows].double(), dim=-1)
        terms = log_p.exp() * (log_p - log_q)
        kls.append(torch.where(torch.isneginf(log_p), 0.0, terms).sum(-1))  # 0 log 0 = 0
    same = ref_logits.argmax(-1) == logits.argmax(-1)
    return torch.cat(kls).cpu(), same.cpu()


def percentile(values: torch.Tensor, fraction: float) -> float:
    """llama.cpp's ``percentile``: linear interpolation between the sorted values at ``fraction * (n - 1)``."""
    v = values.sort().values
    p = fraction * (v.numel() - 1)
    i = min(int(p), v.numel() - 1)
    j = min(i + 1, v.numel() - 1)
    return float((1 - (p - i)) * v[i] + (p - i) * v[j])


def kl_summary(kl: torch.Tensor, same_top: torch.Tensor) -> dict[str, float]:
    """The statistics of ``llama-perplexity --kl-divergence`` over per-token KLs ``kl`` [n] and top-1 matches."""
    n = kl.numel()
    mean = float(kl.mean())
    var = float(((kl - mean) ** 2).mean())  # llama.cpp: sum2/n - mean^2, the uncertainty 0 up to 10 values
    agree = float(same_top.double().mean())
    return {"kl_mean": mean, "kl_mean_se": math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0,
            "kl_median": percentile(kl, 0.5), "kl_p99": percentile(kl, 0.99), "kl_max": float(kl.max()),
            "top1_agreement": agree,
            "top1_agreement_se": math.sqrt(agree * (1 - agree) / (n - 1)) if n > 1 else 0.0}


class ReferenceLogits:
    """The first model's logits at the scored positions of each window, for the KL divergence of the others.

    Kept in memory (float32, on the CPU) window by window while they fit in ``budget`` bytes, as the first
    model is scored; the windows past the budget are recomputed by the first model when asked for, so it stays
    loaded only when some window was not kept (:attr:`complete` false). Memory is thus bounded by the budget
    plus one window's logits, whatever the number of tokens."""

    def __init__(self, model: Any, budget: int) -> None:
        self.model: Any = model
        self.budget = budget
        self.kept: dict[int, torch.Tensor] = {}
        self.used = 0
        self.complete = True

    def offer(self, w: Window, logits: torch.Tensor) -> None:
        rows = scored_rows(logits, w)
        size = rows.numel() * rows.element_size()
        if self.complete and self.used + size <= self.budget:
            self.kept[w.index] = rows.cpu().clone()
            self.used += size
        else:
            self.complete = False

    def release_model_if_unneeded(self) -> None:
        if self.complete:
            self.model = None

    def get(self, w: Window, ids: torch.Tensor) -> torch.Tensor:
        if w.index in self.kept:
            return self.kept[w.index]
        return scored_rows(window_logits(self.model, ids[w.begin:w.end]), w)


def perplexity_and_kl(model: Any, ids: torch.Tensor, reference: ReferenceLogits, *, window: int, stride: int,
                      progress: Callable[[int], None] | None = None, where: str | None = None) -> dict[str, Any]:
    """:func:`perplexity` of ``model`` (the same windows and numbers) and, over the same scored tokens, the
    KL divergence from the first model's next-token distributions and the top-1 agreement (:func:`kl_summary`).
    Raises InputError (about ``where``) when the vocabulary sizes differ."""
    kls: list[torch.Tensor] = []
    same: list[torch.Tensor] = []

    def compare(w: Window, logits: torch.Tensor) -> None:
        ref = reference.get(w, ids).to(logits.device)
        if ref.shape[-1] != logits.shape[-1]:
            raise InputError(f"its vocabulary has {logits.shape[-1]} tokens, the first model's {ref.shape[-1]}: "
                             "no KL divergence between them", where=where, fix="Compare models of one vocabulary.")
        kl, top = token_kl(ref, scored_rows(logits, w))
        kls.append(kl)
        same.append(top)

    ppl, scored = perplexity(model, ids, window=window, stride=stride, progress=progress, on_window=compare)
    return {"perplexity": ppl, "tokens": scored, **kl_summary(torch.cat(kls), torch.cat(same))}


def sentence_embeddings(model: Any, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden states [n, dim] (the sentence-transformers pooling of MiniLM)."""
    device = next(model.parameters()).device
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


EVAL_DTYPES = ("float32", "bfloat16")


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
    reference_cache_bytes: int = 512 * 2**20  # the first model's scored logits kept for the KL divergence
    sentences: int = 12  # with embeddings: how many sentences (0: every one default_sentences finds)
    dtype: str = "float32"  # float32 (exact) or bfloat16 (faster where the CPU has bf16 instructions)

    def check(self) -> None:
        stride = self.stride or self.window
        if self.window < 2 or self.tokens < 2 or not 1 <= stride <= self.window:
            raise OptionError(f"need --window >= 2, --tokens >= 2 and 1 <= --stride <= --window (got {self.window}, "
                              f"{self.tokens}, {stride})", fix="Pick sizes such as --window 1024 --tokens 20000.")
        if self.dtype not in EVAL_DTYPES:
            raise OptionError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got {self.dtype!r}",
                              fix="Use float32 (exact) or bfloat16.")
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
    """Load each model in turn, score it, and return the results (written to ``request.out`` too, when given).
    ``run``: a :class:`~compress.pipeline.run.RunOptions` (device, progress).

    The result: ``metric`` ("perplexity" or "mean_cosine"), ``window``, ``stride``, ``tokens`` (asked for),
    ``text``, and ``models``, one row per model: ``model``, ``loader``, ``size_bytes``, the metric, ``delta`` and
    ``delta_pct`` (against the first model); with perplexity ``tokens`` (scored), with embeddings ``min_cosine``
    and ``sentences``. With perplexity the rows after the first also carry, over the same scored tokens, the KL
    divergence KL(P_first || P_model) of the next-token distributions (nats): ``kl_mean``, ``kl_mean_se`` (its
    standard error), ``kl_median``, ``kl_p99``, ``kl_max``; and ``top1_agreement`` (the share of tokens whose
    most likely next token is the first model's) with ``top1_agreement_se`` (see :func:`kl_summary`).

    Memory: the first model's logits at the scored positions are kept while they fit
    ``request.reference_cache_bytes`` (:class:`ReferenceLogits`); past that, the first model stays loaded and
    recomputes the other windows while each later model is scored window by window beside it. So the peak is
    the models (one, or two when the cache is not enough) plus the cache and about one window's logits of each,
    independent of the number of tokens; only one KL value per scored token is kept (for the median and p99).
    """
    request.check()
    require_transformers()
    keep: list[Any] = []
    rows: list[dict[str, Any]] = []
    state = _EvalState(request)
    for path in request.models:
        started = time.perf_counter()
        loaded = load_model(path, encoder=request.embeddings, device=run.device, keep=keep)
        if request.dtype != "float32" and isinstance(loaded.model, torch.nn.Module):
            loaded.model.to(getattr(torch, request.dtype))
        loaded_at = time.perf_counter()
        row: dict[str, Any] = {"model": str(path), "loader": loaded.how, "size_bytes": loaded.size_bytes,
                               "dtype": request.dtype if isinstance(loaded.model, torch.nn.Module) else "engine's",
                               "load_seconds": round(loaded_at - started, 2)}
        row.update(state.score(path, loaded, run))
        seconds = time.perf_counter() - loaded_at
        row["score_seconds"] = round(seconds, 4)
        if "tokens" in row and seconds > 0:
            row["tokens_per_second"] = round(row["tokens"] / seconds, 1)
        rows.append(row)
        del loaded
        gc.collect()
    return _finish(request, rows, run)


class _EvalState:
    """What `evaluate` carries from the first model to the others: tokenizer, token ids, reference outputs."""

    def __init__(self, request: EvalRequest) -> None:
        self.request = request
        self.text = request.read_text()  # before any model is loaded: a bad --text fails at once
        self.tokenizer: Any = None
        self.ids: torch.Tensor | None = None
        self.reference: Any = None  # first model's embeddings [n, dim], or its ReferenceLogits

    def score(self, path: Path, loaded: LoadedModel, run: Any) -> dict[str, Any]:
        if self.tokenizer is None and loaded.tokenizer_dir is not None:
            self.tokenizer = require_transformers().AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
        if self.tokenizer is None:
            raise InputError("no tokenizer found", where=str(path),
                             fix="List first a model whose folder (or GGUF) carries its tokenizer.")
        if self.request.embeddings:
            return self._embeddings(loaded.model)
        return self._perplexity(path, loaded.model, run)

    def _embeddings(self, model: Any) -> dict[str, Any]:
        sentences = default_sentences(self.request.sentences or None)
        emb = sentence_embeddings(model, self.tokenizer, sentences)
        if self.reference is None:
            self.reference = emb
        cos = torch.nn.functional.cosine_similarity(emb, self.reference, dim=-1)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": len(sentences)}

    def _perplexity(self, path: Path, model: Any, run: Any) -> dict[str, Any]:
        request = self.request
        if self.ids is None:
            self.ids = self._token_ids()
        ids = self.ids
        run.start(path.name, ids.numel(), 1)
        sizes = {"window": request.window, "stride": request.stride or request.window,
                 "progress": lambda n, name=path.name: run.advance(name, n)}
        if self.reference is not None:
            return perplexity_and_kl(model, ids, self.reference, where=str(path), **sizes)
        self.reference = ReferenceLogits(model, request.reference_cache_bytes)
        ppl, scored = perplexity(model, ids, on_window=self.reference.offer, **sizes)
        self.reference.release_model_if_unneeded()
        return {"perplexity": ppl, "tokens": scored}

    def _token_ids(self) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer(self.text)["input_ids"][:self.request.tokens])
        if ids.numel() < 2:
            raise InputError("the text has fewer than 2 tokens", where=str(self.request.text or "default text"),
                             fix="Give a longer text.")
        return ids


def _finish(request: EvalRequest, rows: list[dict[str, Any]], run: Any) -> dict[str, Any]:
    """Deltas against the first model, the result dict, and the report folder when asked for."""
    metric = "mean_cosine" if request.embeddings else "perplexity"
    for row in rows:
        row["delta"] = row[metric] - rows[0][metric]
        row["delta_pct"] = 100 * row["delta"] / rows[0][metric] if rows[0][metric] else 0.0
    result = {"metric": metric, "window": request.window, "stride": request.stride or request.window,
              "tokens": request.tokens,
              "text": str(request.text) if request.text else "pydoc_data/topics.py (Python Language Reference)",
              "models": rows}
    if request.out is not None:
        _write_eval_report(request, result, run)
    return result


KL_COLUMNS = ["KL mean", "KL median", "KL p99", "KL max", "top-1"]


def _kl_cells(row: dict[str, Any]) -> list[str]:
    """The KL and top-1 columns of the report for one row ("-" for the first model)."""
    if "kl_mean" not in row:
        return ["-"] * len(KL_COLUMNS)
    return [f"{row['kl_mean']:.6f} ± {row['kl_mean_se']:.6f}", f"{row['kl_median']:.6f}", f"{row['kl_p99']:.6f}",
            f"{row['kl_max']:.6f}", f"{100 * row['top1_agreement']:.2f}% ± {100 * row['top1_agreement_se']:.2f}%"]


def _write_eval_report(request: EvalRequest, result: dict[str, Any], run: Any) -> None:
    from compress.pipeline.report import human_bytes
    from compress.pipeline.run import json_safe, write_provenance

    assert request.out is not None
    metric = result["metric"]
    kl = metric == "perplexity"
    head = ["model", "loader", "size", metric, "Δ vs first"] + (KL_COLUMNS if kl else [])
    lines = [f"# compress eval: {metric}", "", f"Text: {result['text']}; window {result['window']}, stride "
             f"{result['stride']}, up to {result['tokens']} tokens.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["models"]:
        cells = [f"`{row['model']}`", row["loader"], human_bytes(row["size_bytes"]), f"{row[metric]:.4f}",
                 f"{row['delta']:+.4f} ({row['delta_pct']:+.2f}%)"] + (_kl_cells(row) if kl else [])
        lines.append("| " + " | ".join(cells) + " |")
    if kl and len(result["models"]) > 1:
        lines += ["", "KL: KL(P_first || P_model) of the next-token distributions in nats per scored token "
                  "(mean ± standard error, median, 99th percentile, maximum); top-1: share of scored tokens whose "
                  "most likely next token is the first model's (± standard error); the statistics of llama.cpp's "
                  "`llama-perplexity --kl-divergence`."]
    with OutputFolder(request.out, force=request.force) as staging:
        write_json(staging.path / "report.json", json_safe(result))
        (staging.path / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_provenance(staging.path / "compress_provenance.json", run, "eval", request.models[0], request.out,
                         {"models": [str(m) for m in request.models]})
        staging.commit()
