"""The `compress` command line: parse options, call the pipeline, display with :mod:`compress.render`.

Every user error is a :class:`~compress.errors.CompressError` (or a click usage error) and ends as
one line on stderr with exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

# Only what needs no torch at import: --help, `methods` and option errors answer without loading the math (torch
# takes seconds to import); each command imports the pipeline it runs.
from compress import __version__, render
from compress.catalog import (
    ALGORITHMS,
    BLOCK_SIZES,
    COMBINE,
    DEVICES,
    EXECUTORS,
    FORMATS,
    GROUP_SIZES,
    METHODS,
    QALORA_POOLINGS,
    STRATEGIES,
)
from compress.errors import CompressError, OptionError
from compress.units import parse_size

if TYPE_CHECKING:
    from compress.pipeline.run import RunOptions


def _console(*, stderr: bool) -> Console:
    """Rich's console; when the stream is not a terminal (a pipe, a CI log) tables get the width they need instead
    of rich's 80 columns, so that no cell is cut (COLUMNS, when set, still decides)."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty())
    return Console(stderr=stderr, emoji=False, width=PIPED_WIDTH if piped and "COLUMNS" not in os.environ else None)


PIPED_WIDTH = 4000
err_console = _console(stderr=True)
out_console = _console(stderr=False)
_invocation: list[str] = []  # the command line of this run, for provenance

METHOD_HELP = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
FORMAT_HELP = "; ".join(f"{f.name} ({'/'.join(f.methods)}): {f.summary}" for f in FORMATS.values())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="compress")
def cli() -> None:
    """Make large language models cheap to ship: 4-bit quantization with an accuracy report."""


def output_options(f: Any) -> Any:
    """--json, --quiet, --force (every writing command)."""
    f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of tables.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar and no tables.")(f)
    return click.option("--force", is_flag=True, help="Replace OUT if it exists (atomically, after success).")(f)


def algorithm_options(f: Any, *, seed: bool = True) -> Any:
    """--algorithm and the calibration options (quantize, merge --quantize; merge has its own --seed)."""
    f = click.option("--save-imatrix", type=click.Path(path_type=Path), default=None,
                     help="gguf: also write the importance matrix used (.gguf as current llama.cpp, or .dat).")(f)
    f = click.option("--imatrix", type=click.Path(path_type=Path), default=None,
                     help="gguf: weight llama.cpp's scale searches with this importance matrix (llama-imatrix's "
                          ".gguf or .dat, or ours), as llama-quantize --imatrix does.")(f)
    f = click.option("--act-order", is_flag=True,
                     help="gptq: round the inputs with the most activation energy first; in the gptq layout the "
                          "groups follow that order (g_idx, desc_act), elsewhere they stay contiguous.")(f)
    if seed:
        f = click.option("--seed", type=int, default=0, show_default=True,
                         help="Seed of the calibration sample offsets.")(f)
    f = click.option("--calibration-length", type=int, default=512, show_default=True,
                     help="Tokens per calibration sample.")(f)
    f = click.option("--calibration-samples", type=int, default=128, show_default=True,
                     help="Calibration samples drawn from the text.")(f)
    f = click.option("--calibration", default=None,
                     help="A UTF-8 text file to calibrate on, or 'default' (built-in: standard-library documentation, "
                          "disjoint from the text the reports evaluate on). gptq: its activations (default: "
                          "default); gguf: computes an importance matrix.")(f)
    return click.option("--algorithm", type=click.Choice(list(ALGORITHMS)), default="rtn", show_default=True,
                        help="How each group's grid and codes are chosen. " + "; ".join(f"{k}: {v}" for k, v in
                                                                                        ALGORITHMS.items()))(f)


def algorithm_settings(common: dict[str, Any], container: str, seed: int | None = None) -> Any:
    """Pop the algorithm options from ``common``: an AlgorithmSettings checked for the output ``container``."""
    from compress.calib.text import CalibrationOptions
    from compress.pipeline.algorithm import AlgorithmSettings
    from compress.quant.gptq import GPTQConfig

    algorithm, source, samples, length, act_order, imatrix, save = (common.pop(k) for k in (
        "algorithm", "calibration", "calibration_samples", "calibration_length", "act_order", "imatrix",
        "save_imatrix"))
    seed = common.pop("seed") if seed is None else seed
    if act_order and algorithm != "gptq":
        raise OptionError("--act-order applies to --algorithm gptq", fix="Add --algorithm gptq, or drop --act-order.")
    sampling = CalibrationOptions(source or "default", samples, length, seed)
    gptq = GPTQConfig(act_order=act_order) if algorithm == "gptq" else None
    return AlgorithmSettings(algorithm, None if source is None else sampling, gptq, imatrix, save,
                             sampling).for_container(container)


def shard_option(f: Any) -> Any:
    return click.option("--shard-size", default="5GB", show_default=True,
                        help="Largest safetensors shard, e.g. 500MB, 2GiB.")(f)


def run_options(f: Any) -> Any:
    """--device and the executor options (every command that runs tasks)."""
    f = click.option("--ray-address", default=None,
                     help="With --executor ray: a running cluster's head (host:port); default: a local Ray.")(f)
    f = click.option("--executor", type=click.Choice(list(EXECUTORS)), default="local", show_default=True,
                     help="local: this machine (--workers processes); ray: Ray tasks, locally or on a cluster.")(f)
    f = click.option("--threads", default="1", show_default=True,
                     help="Torch threads per task, in every executor; 'auto': the cores divided among the workers. "
                          "Quantized weights never depend on it; SVD-based factors and float64 error sums can "
                          "differ in the last bits between thread counts.")(f)
    f = click.option("--workers", default="1", show_default=True,
                     help="Tasks run at once: N worker processes (or Ray tasks), or 'auto' for every available core. "
                          "Outputs are byte-identical for any value.")(f)
    f = verbose_option(f)
    return click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
                        help="Where the math runs (auto: CUDA when available).")(f)


def needs_libraries(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that runs (not --help, not `methods`): torch is imported first with the stop signals held."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        load_libraries()
        return command(*args, **kwargs)

    return run


def load_libraries() -> None:
    """Import torch with Ctrl-C, SIGTERM and SIGHUP held until it is loaded, then acted on: raised inside torch's
    import (seconds), a KeyboardInterrupt can be swallowed by an import guard there (the run then went on) or cross
    its C++ code and abort the process. The CLI module itself loads without torch (``--help`` answers at once)."""
    import signal
    import threading

    if "torch" in sys.modules:
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held} if main_thread else {}
    try:
        import torch  # noqa: F401
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(received[0])


def verbose_option(f: Any) -> Any:
    return click.option("--verbose", "-v", is_flag=True,
                        help="Every tensor of a --dry-run plan, and the warnings and progress output of the "
                             "libraries compress runs (transformers, PEFT, torch), which are hidden otherwise.")(f)


# What the libraries print on their own (transformers' logging and loading bars, the Hub's bars) is off unless
# --verbose; the environment is how they read it before they are imported.
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextlib.contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """The libraries' warnings (Python warnings from transformers, PEFT, torch, ...) caught while a command runs:
    with ``verbose`` each is shown as one line at the end, with their logging and progress bars on; otherwise their
    logging and bars are off and one line says how many warnings were hidden."""
    saved = {k: os.environ.get(k) for k in QUIET_LIBRARIES}
    transformers_logging = sys.modules.get("transformers.utils.logging")
    level = transformers_logging.get_verbosity() if transformers_logging else None
    if not verbose:
        os.environ.update(QUIET_LIBRARIES)
    if transformers_logging is not None:  # imported already (in-process callers): its settings are read
        if verbose:
            transformers_logging.set_verbosity_warning()
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.set_verbosity_error()
            transformers_logging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if transformers_logging is not None and level is not None:
                transformers_logging.set_verbosity(level)
                transformers_logging.enable_progress_bar()
            _show_library_warnings(list(caught), verbose)


def _show_library_warnings(caught: list[warnings.WarningMessage], verbose: bool) -> None:
    lines = list(dict.fromkeys(f"{w.category.__name__}: {(str(w.message).strip().splitlines() or [''])[0]}"
                               for w in caught))
    if not lines:
        return
    if verbose:
        for line in lines:
            err_console.print(f"library warning: {line}", markup=False, highlight=False, emoji=False,
                              soft_wrap=True)
    else:
        err_console.print(f"note: {len(lines)} warning{'s' if len(lines) > 1 else ''} from the libraries hidden "
                          "(--verbose shows them)", markup=False, highlight=False, emoji=False, soft_wrap=True)


@contextlib.contextmanager
def running(device: str, workers: str, executor: str, ray_address: str | None, show: bool,
            threads: str = "1", verbose: bool = False) -> Iterator[RunOptions]:
    """The RunOptions of a command, with a progress bar while it runs when ``show``; the libraries' own output
    hidden unless ``verbose`` (:func:`library_output`)."""
    from compress.pipeline.execute import ExecutorOptions, parse_threads, parse_workers, resolve_device
    from compress.pipeline.run import RunOptions

    options = ExecutorOptions(kind=executor, workers=parse_workers(workers), ray_address=ray_address,
                              threads=parse_threads(threads))
    torch_device = resolve_device(device)
    with library_output(verbose), render.progress(err_console, show) as bar:
        yield RunOptions(device=torch_device, executor=options, progress=bar, argv=tuple(_invocation))


def shard_bytes(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise OptionError(f"--shard-size {text!r} is not a size",
                          fix="Use a number with a unit, e.g. 5GB or 500MB.") from e


def budget_bytes(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise OptionError(f"--budget {text!r} is not a size", fix="Use a number with a unit, e.g. 20MB.") from e


def need_output(out: Path | None, dry_run: bool, what: str = "OUT") -> None:
    if out is None and not dry_run:
        raise OptionError("missing output folder", fix=f"Pass -o {what} (or --dry-run to only see the plan).")


def checked(make: Callable[[], Any], command: str) -> Any:
    """``make()``, its ValueError turned into one line that points at the command's --help."""
    try:
        return make()
    except ValueError as e:
        raise OptionError(str(e), fix=f"Change that value (`compress {command} --help` describes every option).") from e


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Output folder (required unless --dry-run).")
@click.option("--method", type=click.Choice(list(METHODS)), default="nf4", show_default=True, help=METHOD_HELP)
@click.option("--format", "format_name", type=click.Choice(list(FORMATS)), default=None,
              help=f"Output layout (default: the method's natural one). {FORMAT_HELP}")
@click.option("--block-size", type=int, default=64, show_default=True,
              help=f"nf4/fp4: elements per absmax block: {', '.join(map(str, BLOCK_SIZES))}.")
@click.option("--double-quant/--no-double-quant", default=False, show_default=True,
              help="nf4/fp4: quantize the absmax values to 8 bits too (~0.37 fewer bits per weight).")
@click.option("--group-size", type=int, default=None,
              help=f"int4: input channels per group, one of {', '.join(map(str, GROUP_SIZES))} (default 128, or the "
                   "largest size that lets the layout hold every selected layer: compressed-tensors needs it to "
                   "divide the input size).")
@click.option("--allow-float", is_flag=True,
              help="int4: accept an explicit --group-size that leaves more than 1% of the quantizable parameters in "
                   "float (otherwise an error names the group sizes that work).")
@click.option("--sym/--asym", "symmetric", default=False, show_default=True,
              help="int4: symmetric (zero fixed at 8) or asymmetric (4-bit zero per group).")
@click.option("--include", default=None, help="Regex: also quantize 2-D float weights whose name matches.")
@click.option("--exclude", default=None, help="Regex: keep tensors whose name matches in their dtype.")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, methods, projected size); write nothing.")
@click.option("--tokenizer", default=None, metavar="PATH|none",
              help="gguf: the tokenizer to carry (default: the model's own): a tokenizer.json or a folder with one, "
                   "or 'none' (llama.cpp cannot run the file then).")
@algorithm_options
@run_options
@shard_option
@output_options
@needs_libraries
def quantize(model: Path, out: Path | None, method: str, format_name: str | None, block_size: int,
             double_quant: bool, group_size: int | None, allow_float: bool, symmetric: bool, include: str | None,
             exclude: str | None, dry_run: bool, verbose: bool, tokenizer: str | None, shard_size: str,
             **common: Any) -> None:
    """Quantize the Linear weights of MODEL (HF folder, .safetensors or .gguf) to 4 bits (NF4, FP4, INT4 in a
    folder) or to a llama.cpp file type (4 to 8 bits, --format gguf)."""
    from compress.pipeline import calibrated, gguf
    from compress.pipeline import quantize as q
    from compress.pipeline.plan import check_algorithm
    from compress.quant import make_config

    fmt = FORMATS[format_name or METHODS[method].default_format]
    if method not in fmt.methods:
        pairs = ", ".join(f"{m}+{f.name}" for f in FORMATS.values() for m in f.methods)
        raise OptionError(f"--format {fmt.name} cannot hold --method {method}", fix=f"Pairs that work: {pairs}.")
    config = checked(lambda: make_config(method, block_size=block_size, double_quant=double_quant,
                                         group_size=128 if group_size is None else group_size, symmetric=symmetric),
                     "quantize")
    size = shard_bytes(shard_size)
    need_output(out, dry_run)
    as_json, quiet, force = (common.pop(k) for k in ("as_json", "quiet", "force"))
    settings = algorithm_settings(common, fmt.container)
    with running(**common, show=not (quiet or as_json), verbose=verbose) as run:
        if fmt.container == "file":
            check_algorithm(method, settings.algorithm)
            if include is not None or exclude is not None:
                raise OptionError("--include/--exclude do not apply to --format gguf",
                                  fix="llama.cpp needs every tensor; the types are chosen per tensor (see --dry-run).")
            if dry_run:
                return render.gguf_plan(out_console, *gguf.dry_run_gguf(model, method, settings), as_json)
            assert out is not None
            report = gguf.quantize_gguf(gguf.GGUFRequest(model, out, method, force, settings, tokenizer or "auto"),
                                        run)
            side = gguf.sidecar_paths(out)["report_json"]
            return render.result(out_console, out, report, report.bytes_after, as_json=as_json, quiet=quiet,
                                 report_json=side)
        if tokenizer is not None:
            raise OptionError("--tokenizer applies to --format gguf",
                              fix="Drop it: a folder output copies the model's tokenizer files as they are.")
        request = q.QuantizeRequest(model, out, method, config, fmt.name, include, exclude, size, force,
                                    settings.algorithm)
        request, line = q.settle_group_size(request, explicit=group_size is not None, allow_float=allow_float)
        if line is not None and not as_json:
            err_console.print(f"note: {line}", markup=False, highlight=False, emoji=False, soft_wrap=True)
        if dry_run:
            return render.quantize_plan(out_console, q.dry_run_quantize(request), as_json, verbose)
        report = (q.quantize_folder(request, run) if settings.calibration is None else
                  calibrated.quantize_calibrated(request, settings.calibration, settings.gptq, run))
    render.result(out_console, out, report, report.bytes_after, as_json=as_json, quiet=quiet)  # type: ignore[arg-type]


@cli.command("extract-lora")
@click.option("--base", "base_path", required=True, type=click.Path(path_type=Path), help="The base checkpoint.")
@click.option("--tuned", "tuned_path", required=True, type=click.Path(path_type=Path),
              help="The fine-tuned checkpoint (same architecture).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Adapter folder (required unless --dry-run).")
@click.option("--rank", type=int, default=None, help="Fixed rank for every module (default 16 when no rule is given).")
@click.option("--energy", type=float, default=None,
              help="Smallest rank whose retained energy sum(s_i^2)/||dW||^2 reaches this fraction (0, 1].")
@click.option("--sv-threshold", type=float, default=None, help="Keep singular values above this absolute value.")
@click.option("--max-rank", type=int, default=256, show_default=True, help="Cap for every rule.")
@click.option("--svd", "engine", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="exact: full float32 SVD; randomized: range finder + power iterations; auto: randomized when the "
                   "rank is at most 1/4 of the matrix's smaller side.")
@click.option("--targets", default="all-linear", show_default=True,
              help="'all-linear' (Linear weights in the transformer blocks) or a regex searched in weight names.")
@click.option("--embeddings", type=click.Choice(["skip", "lora", "full"]), default="skip", show_default=True,
              help="Embeddings and lm_head: skip (serving engines reject them), LoRA, or full copies "
                   "(modules_to_save).")
@click.option("--dtype", "dtype_choice", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="dtype of the saved factors.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the randomized SVD and of the calibration sample offsets.")
@click.option("--budget", default=None,
              help="One size for all LoRA factors (e.g. 20MB): ranks allocated across modules where they remove the "
                   "most error per stored parameter (activation-weighted with --calibration), capped by --max-rank; "
                   "written as rank_pattern / alpha_pattern.")
@click.option("--mean-rank", type=int, default=None,
              help="As --budget, with the size of this rank in every module.")
@click.option("--calibration", default=None,
              help="Activation-aware extraction: a UTF-8 text file, or 'default' (built-in text). The base model runs "
                   "on it block by block and each module's delta is factored to minimise the error of its output "
                   "on those inputs, not of its weights.")
@click.option("--calibration-samples", type=int, default=128, show_default=True,
              help="Calibration samples drawn from the text.")
@click.option("--calibration-length", type=int, default=512, show_default=True, help="Tokens per calibration sample.")
@click.option("--aware", type=click.Choice(["diagonal", "whitened"]), default=None,
              help="With --calibration: diagonal (ASVD: each input column weighted by its activations' rms^0.5; the "
                   "default) or whitened (the least output error on the calibration inputs, SVD of dW L; the default "
                   "with --quantized-base, where it also corrects the base's rounding: on a real fine-tune it kept "
                   "less of the improvement than plain SVD as a LoRA, far more as a QA-LoRA).")
@click.option("--quantized-base", "quantized_base", type=click.Path(path_type=Path), default=None,
              help="QA-LoRA form: the group-wise INT4 model made from --base (ours, or a GPTQ checkpoint without "
                   "act-order). The adapter is extracted from TUNED minus this model, with lora_A over inputs pooled "
                   "in groups, so that `compress merge QUANTIZED --adapter A --quantize int4 --strategy fold` folds "
                   "it into the zero points with codes and scales untouched.")
@click.option("--qalora-group-size", type=int, default=None,
              help="Input channels pooled per lora_A column with --quantized-base (default: the base's group size; "
                   "must be a multiple of it and divide every input size).")
@click.option("--refine-steps", type=int, default=0, show_default=True,
              help="After the SVD, refine all factors together for this many Adam steps so that base + adapter "
                   "matches the tuned model's next-token distributions (KL) on the --calibration text; 1/8 of its "
                   "samples are held out and the refined factors are kept only if their KL went down. Holds both "
                   "models in float32. Best with the fine-tune's own training text.")
@click.option("--refine-lr", type=float, default=2e-4, show_default=True, help="Adam learning rate of --refine-steps.")
@click.option("--lora-only", is_flag=True,
              help="Write LoRA factors only: changed norm weights and other vectors of non-target modules, kept "
                   "whole (modules_to_save) by default, are left out and reported (for vLLM, which loads LoRA only).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the largest possible adapter; write nothing.")
@run_options
@output_options
@needs_libraries
def extract_lora(base_path: Path, tuned_path: Path, out: Path | None, rank: int | None, energy: float | None,
                 sv_threshold: float | None, max_rank: int, engine: str, targets: str, embeddings: str,
                 dtype_choice: str, seed: int, budget: str | None, mean_rank: int | None, calibration: str | None,
                 calibration_samples: int, calibration_length: int, aware: str | None, quantized_base: Path | None,
                 qalora_group_size: int | None, refine_steps: int, refine_lr: float, lora_only: bool, dry_run: bool,
                 verbose: bool, **common: Any) -> None:
    """Recover a PEFT LoRA adapter from BASE and TUNED by truncated SVD of each weight delta."""
    import torch

    from compress.calib.text import CalibrationOptions
    from compress.lowrank.refine import RefineOptions
    from compress.lowrank.svd import RankRule
    from compress.pipeline.extract import (
        Budget,
        ExtractOptions,
        ExtractRequest,
        dry_run_extract,
        extract_lora,
        quantized_group_size,
    )

    if (budget is not None or mean_rank is not None) and not (rank is None and energy is None and sv_threshold is None):
        raise OptionError("--budget / --mean-rank choose every rank: drop --rank, --energy and --sv-threshold",
                          fix="Keep --max-rank to cap the ranks the budget may give.")
    rank = 16 if rank is None and energy is None and sv_threshold is None else rank
    rule = checked(lambda: RankRule(rank=rank, energy=energy, sv_threshold=sv_threshold, max_rank=max_rank),
                   "extract-lora")
    sized = None
    if budget is not None or mean_rank is not None:
        size = None if budget is None else budget_bytes(budget)
        sized = checked(lambda: Budget(bytes=size, mean_rank=mean_rank), "extract-lora")
    if qalora_group_size is not None and quantized_base is None:
        raise OptionError("--qalora-group-size needs --quantized-base (the INT4 model the adapter will fold into)",
                          fix="Add --quantized-base QUANTIZED, the group-wise INT4 model made from --base.")
    if quantized_base is not None and qalora_group_size is None:
        qalora_group_size = quantized_group_size(quantized_base)
    calib = None if calibration is None else checked(
        lambda: CalibrationOptions(calibration, calibration_samples, calibration_length, seed), "extract-lora")
    refine = None if refine_steps == 0 else checked(lambda: RefineOptions(refine_steps, refine_lr), "extract-lora")
    options = checked(lambda: ExtractOptions(rule=rule, engine=engine, targets=targets, embeddings=embeddings,
                                             dtype=getattr(torch, dtype_choice), seed=seed, calibration=calib,
                                             budget=sized, lora_only=lora_only, refine=refine,
                                             aware=aware or ("whitened" if quantized_base else "diagonal"),
                                             qalora_group_size=qalora_group_size), "extract-lora")
    as_json, quiet, force = common.pop("as_json"), common.pop("quiet"), common.pop("force")
    with running(**common, show=not (quiet or as_json), verbose=verbose) as run:
        need_output(out, dry_run, "ADAPTER")
        request = ExtractRequest(base_path, tuned_path, out, options, force, quantized_base)
        if dry_run:
            return render.extract_plan(out_console, dry_run_extract(request), rule, as_json, sized,
                                       qalora_group_size, verbose, refine)
        report = extract_lora(request, run)
    render.result(out_console, out, report, report.adapter_bytes, as_json=as_json, quiet=quiet)  # type: ignore[arg-type]


@cli.command()
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Float checkpoint folder.")
@click.option("--dtype", "dtype_choice", type=click.Choice(["original", "float32", "float16", "bfloat16"]),
              default="original", show_default=True, help="Dtype of the dequantized weights.")
@run_options
@shard_option
@output_options
@needs_libraries
def dequantize(quantized: Path, out: Path, dtype_choice: str, shard_size: str, **common: Any) -> None:
    """Turn a quantized checkpoint (any --format output, or a .gguf) back into a float checkpoint."""
    from compress.pipeline.dequantize import DequantizeRequest, dequantize

    size = shard_bytes(shard_size)
    as_json, quiet, force = common.pop("as_json"), common.pop("quiet"), common.pop("force")
    with running(**common, show=not (quiet or as_json)) as run:
        summary = dequantize(DequantizeRequest(quantized, out, dtype_choice, size, force), run)
    render.dequantized(out_console, summary, as_json=as_json, quiet=quiet)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor (default: a summary by kind).")
@needs_libraries
def inspect(path: Path, as_json: bool, show_tensors: bool) -> None:
    """Show what is inside a checkpoint: tensors, dtypes, sizes and quantization."""
    from compress.inspect import inspect_checkpoint

    data = inspect_checkpoint(path, list_tensors=show_tensors or as_json)
    render.inspected(out_console, data, as_json=as_json, show_tensors=show_tensors)


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to score (default: the Python Language Reference shipped with CPython).")
@click.option("--tokens", type=int, default=20000, show_default=True, help="Score the first N tokens of the text.")
@click.option("--window", type=int, default=1024, show_default=True, help="Tokens per forward pass.")
@click.option("--stride", type=int, default=None, help="Window step (default: --window, no overlap).")
@click.option("--embeddings", is_flag=True, help="Encoders: cosine of sentence embeddings against the first model.")
@click.option("--sentences", type=click.IntRange(min=0), default=12, show_default=True,
              help="With --embeddings: the first sentence of this many Language Reference topics (0: all 79).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Also write report.json and report.md into this folder.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="Where the models run (auto: CUDA when available).")
@click.option("--dtype", "dtype_name", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Compute dtype of the transformers models: float32 (exact) or bfloat16 "
                                      "(faster on CPUs with bf16 instructions; llama.cpp keeps its own).")
@verbose_option
@output_options
@needs_libraries
def evaluate(models: tuple[Path, ...], text_path: Path | None, tokens: int, window: int, stride: int | None,
             embeddings: bool, sentences: int, out: Path | None, device: str, dtype_name: str, verbose: bool,
             as_json: bool, quiet: bool, force: bool) -> None:
    """What compression cost, side by side: perplexity of causal LMs, with the KL divergence from the first
    model's next-token distributions and top-1 agreement (or embedding cosine of encoders)."""
    from compress import evaluation

    request = evaluation.EvalRequest(models, text_path, tokens, window, stride, embeddings, out, force,
                                     sentences=sentences, dtype=dtype_name)
    with running(device, "1", "local", None, show=not (quiet or as_json), verbose=verbose) as run:
        result = evaluation.evaluate(request, run)
    render.evaluated(out_console, result, as_json=as_json, quiet=quiet)


@cli.command("merge")
@click.argument("base_path", metavar="BASE", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_paths", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A PEFT LoRA adapter folder (repeat for several; QA-LoRA, DoRA, rsLoRA adapters included).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each adapter, in --adapter order (repeat; default 1.0 for every adapter).")
@click.option("--combine", "combine_name", type=click.Choice(list(COMBINE)), default="sum", show_default=True,
              help="; ".join(f"{m.name}: {m.summary} ({m.paper})" for m in COMBINE.values()))
@click.option("--density", type=float, default=None,
              help="ties: fraction of each delta kept by magnitude; dare: probability an element survives "
                   "(default 0.5).")
@click.option("--rank", type=int, default=None, help="svd: target rank (default: the largest adapter rank).")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the drop masks; svd: of the "
              "randomized SVD.")
@click.option("--qalora-pooling", type=click.Choice(list(QALORA_POOLINGS)), default="peft", show_default=True,
              help="How QA-LoRA adapters pooled each input group in training: peft (PEFT 0.21: group mean times "
                   "in/g), mean (QA-LoRA reference code), sum (QA-LoRA paper).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Output checkpoint folder (required unless --dry-run).")
@click.option("--quantize", "quantize_method", type=click.Choice(["none", *METHODS]), default="none",
              show_default=True, help="Quantize the merged model (none: a float checkpoint in the base's dtype). "
              f"{METHOD_HELP}")
@click.option("--format", "format_name", type=click.Choice(list(FORMATS)), default=None,
              help="Output layout with --quantize (default: the method's natural one; native keeps folded "
                   "QA-LoRA updates exact).")
@click.option("--strategy", type=click.Choice(["auto", *STRATEGIES]), default="auto", show_default=True,
              help="How updates enter quantized weights: fold (QA-LoRA: into float offsets, exact), fold-requant, "
                   "refit, requantize (dequantize, add, quantize), float (quantize float base + update); auto: "
                   "an exact fold, else float when --float-base is given, else the smallest error.")
@click.option("--float-base", "float_base_path", type=click.Path(path_type=Path), default=None,
              help="The float checkpoint a quantized BASE was made from (enables the 'float' strategy).")
@click.option("--block-size", type=int, default=64, show_default=True,
              help=f"nf4/fp4: elements per absmax block: {', '.join(map(str, BLOCK_SIZES))}.")
@click.option("--double-quant/--no-double-quant", default=False, show_default=True,
              help="nf4/fp4: quantize the absmax values to 8 bits too.")
@click.option("--group-size", type=int, default=None,
              help=f"int4: input channels per group, one of {', '.join(map(str, GROUP_SIZES))} (default: the "
                   "quantized base's, else 128).")
@click.option("--sym/--asym", "symmetric", default=False, show_default=True, help="int4: symmetric or asymmetric.")
@click.option("--dry-run", is_flag=True, help="Print which tensors each adapter changes (a summary; every tensor with "
              "--verbose); write nothing.")
@functools.partial(algorithm_options, seed=False)
@run_options
@shard_option
@output_options
@needs_libraries
def merge(base_path: Path, adapter_paths: tuple[Path, ...], weights: tuple[float, ...], combine_name: str,
          density: float | None, rank: int | None, seed: int, qalora_pooling: str, out: Path | None,
          quantize_method: str, format_name: str | None, strategy: str, float_base_path: Path | None,
          block_size: int, double_quant: bool, group_size: int | None, symmetric: bool, dry_run: bool,
          shard_size: str, verbose: bool, **common: Any) -> None:
    """Merge LoRA adapters into BASE (a float checkpoint, or a compress NF4/INT4 output, dequantized first)."""
    from compress.pipeline import merge as m

    settings = algorithm_settings(common, FORMATS[format_name or METHODS[quantize_method].default_format].container
                                  if quantize_method != "none" else "folder", seed)
    if settings.algorithm != "rtn" and quantize_method == "none":
        raise OptionError(f"--algorithm {settings.algorithm} applies with --quantize", fix="Add --quantize METHOD.")
    request = m.MergeRequest(base_path, adapter_paths, out, weights, combine_name, density, rank, seed, qalora_pooling,
                             quantize_method, format_name, strategy, float_base_path, block_size, double_quant,
                             group_size, symmetric, shard_bytes(shard_size), common.pop("force"), settings)
    as_json, quiet = common.pop("as_json"), common.pop("quiet")
    with running(**common, show=not (quiet or as_json), verbose=verbose) as run:
        if dry_run:
            return render.merge_plan(out_console, m.dry_run_merge(request), as_json, verbose)
        need_output(out, dry_run)
        result = m.merge(request, run)
    render.merge_result(out_console, result, as_json=as_json, quiet=quiet)


@cli.command("methods")
def list_methods() -> None:
    """List quantization methods and output formats (from the registries)."""
    render.methods(out_console)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a job scheduler, `docker stop`, a closed terminal), raised where the program is, so that
    it unwinds as Ctrl-C does: temporary outputs removed, workers stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP handled like SIGINT while a command runs (main thread only; restored after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _stopped(e: Terminated) -> int:
    import signal

    err_console.print(f"stopped by {signal.Signals(e.signum).name}; nothing was written", markup=False, emoji=False)
    return 128 + e.signum


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line and exit code 2 for every user error."""
    _invocation[:] = list(sys.argv[1:] if argv is None else argv)
    from compress.formats.output import start_command

    start_command()
    try:
        with stop_signals():
            cli.main(args=argv, prog_name="compress", standalone_mode=False)
    except CompressError as e:
        err_console.print(f"error: {e.message}", markup=False, highlight=False, emoji=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Abort as e:  # click's form of Ctrl-C (and of the signals raised as Terminated)
        if isinstance(e.__cause__, Terminated):
            return _stopped(e.__cause__)
        err_console.print("interrupted; nothing was written", markup=False, emoji=False)
        return 130
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from compress.formats.output import disk_full_message

        err_console.print(f"error: {disk_full_message(e)}. Free some space, or write elsewhere (-o).", markup=False,
                          highlight=False, emoji=False, soft_wrap=True)
        return 2
    except click.ClickException as e:
        err_console.print(f"error: {' '.join(e.format_message().split())}", markup=False, highlight=False, emoji=False,
                          soft_wrap=True)
        return 2
    except Terminated as e:
        return _stopped(e)
    except KeyboardInterrupt:
        err_console.print("interrupted; nothing was written", markup=False, emoji=False)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
