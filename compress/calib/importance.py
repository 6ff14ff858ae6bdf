"""An importance matrix computed the way ``llama-imatrix`` does it: the model (float weights) run on the calibration
text, and for every weight matrix the sum over tokens of each input column's square (``in_sum2``) and the token
count -- here block by block through :class:`~compress.calib.runner.CalibrationRunner`, so memory stays one block
plus the activations. Names are llama.cpp's (``blk.0.attn_q.weight``, ``output.weight``), given by the caller's
map from checkpoint names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from compress.calib.runner import CalibrationRunner, LinearStatistics
from compress.calib.text import CalibrationOptions, read_calibration, token_samples, tokenize
from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.imatrix import ImatrixEntry, ImportanceMatrix


def calibration_tokens(model: Path, calibration: CalibrationOptions, keep: list[Any]) -> tuple[torch.Tensor, str]:
    """The token samples [samples, length] of the calibration text with the model's own tokenizer, and the text's
    sha256."""
    from compress.evaluation import require_transformers, tokenizer_dir

    transformers = require_transformers()
    text = read_calibration(calibration.source)
    tok_dir = tokenizer_dir(model, keep)
    if tok_dir is None:
        raise InputError("the model has no tokenizer files, which calibration needs", where=str(model),
                         fix="Add the tokenizer files (tokenizer.json, tokenizer_config.json) to the model folder.")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    return token_samples(tokenize(tokenizer, text), calibration, where=text.source), text.sha256


def compute_importance(model: Path, reader: CheckpointReader, calibration: CalibrationOptions,
                       device: torch.device, names: Mapping[str, str]) -> ImportanceMatrix:
    """The importance matrix of ``reader``'s model on the calibration text; ``names``: checkpoint name -> the
    llama.cpp name of each tensor that should get an entry (others are left out)."""
    keep: list[Any] = []
    tokens, _ = calibration_tokens(model, calibration, keep)
    runner = CalibrationRunner(reader, tokens, device)
    stats: dict[str, LinearStatistics] = {}
    for block in runner:
        stats.update(block.statistics(diagonal=True))
        block.finish({})  # llama-imatrix measures the float model: the next block sees unquantized outputs
    stats.update(runner.head_statistics())
    entries = {names[name]: ImatrixEntry(s.H.float().cpu().contiguous(),
                                         torch.tensor([float(s.rows)], dtype=torch.float64))
               for name, s in stats.items() if name in names}
    return ImportanceMatrix(entries, chunks=calibration.samples, datasets=(calibration.source,),
                            chunk_size=calibration.length)
