"""The calibration text and its token samples.

The built-in default (``--calibration default``) is the documentation strings of ~100 standard-library modules,
collected once by scripts/make_calibration_text.py and shipped gzipped in the package: offline, fixed across
Python versions, and disjoint from ``pydoc_data/topics.py`` (the Language Reference), which the reports evaluate
on. A user's own text is any UTF-8 file.

Samples: the whole text is tokenized once; ``n`` windows of ``length`` tokens start at offsets drawn from a
``torch.Generator`` seeded with ``seed`` (sorted, so the sample order is that of the text). The same text,
tokenizer and options always give the same samples.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError, OptionError

DEFAULT = "default"
DEFAULT_FILE = "default_calibration.txt.gz"


@dataclass(frozen=True)
class CalibrationOptions:
    """``--calibration FILE|default``, ``--calibration-samples``, ``--calibration-length``, ``--seed``."""

    source: str = DEFAULT
    samples: int = 128
    length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.length < 2:
            raise OptionError(f"--calibration-samples {self.samples} / --calibration-length {self.length} are too "
                              "small", fix="Use at least 1 sample of at least 2 tokens (e.g. 128 x 512).")

    def as_dict(self) -> dict[str, Any]:
        return {"calibration": self.source, "samples": self.samples, "length": self.length, "seed": self.seed}


@dataclass(frozen=True)
class CalibrationText:
    text: str
    source: str  # "default" or the file's path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def default_text() -> str:
    data = resources.files("compress.calib").joinpath(DEFAULT_FILE).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def read_calibration(source: str) -> CalibrationText:
    """The text of ``--calibration`` (``default`` or a file path); InputError if it is missing, empty or not text."""
    if source == DEFAULT:
        return CalibrationText(default_text(), DEFAULT)
    path = Path(source)
    fix = "Give a UTF-8 text file (or --calibration default, the built-in text)."
    if not path.is_file():
        raise InputError("no such calibration file", where=source, fix=fix)
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise InputError("the calibration file is not text (it holds NUL bytes)", where=source, fix=fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the calibration file is not UTF-8 text ({e.reason} at byte {e.start})", where=source,
                         fix=fix) from e
    if not text.strip():
        raise InputError("the calibration file is empty", where=source, fix=fix)
    return CalibrationText(text, str(path))


def token_samples(ids: torch.Tensor, options: CalibrationOptions, where: str) -> torch.Tensor:
    """int64 [samples, length]: windows of the token ids [n] at seeded random offsets (module docstring)."""
    n = int(ids.numel())
    if n < options.length:
        raise InputError(f"the calibration text has {n} tokens, fewer than one sample of --calibration-length "
                         f"{options.length}", where=where,
                         fix="Give a longer text, or a smaller --calibration-length.")
    generator = torch.Generator().manual_seed(options.seed)
    starts = torch.randint(0, n - options.length + 1, (options.samples,), generator=generator).sort().values
    return torch.stack([ids[s:s + options.length] for s in starts.tolist()])


def tokenize(tokenizer: Any, text: CalibrationText) -> torch.Tensor:
    """int64 [n]: the whole text's token ids (no special tokens: samples are cut from the middle of the text).
    ``verbose=False``: the text is longer than the model's context by design (the samples are cut to length
    afterwards), which transformers would otherwise warn about."""
    ids = tokenizer(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
