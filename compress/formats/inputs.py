"""Opening any input: a checkpoint folder, a ``.safetensors`` file or a ``.gguf`` file, as stored
(:func:`open_checkpoint`) or as float tensors (:func:`open_model`, quantized layouts dequantized tensor by
tensor). Every problem is an :class:`~compress.errors.InputError` naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader, SafetensorsReader
from compress.formats.gguf_reader import GGUFReader
from compress.formats.quantized import DequantizingReader, format_of


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror})", where=str(path),
                         fix="Check that it exists and is readable.") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", where=str(path), fix="Fix or re-download the file.") from e


def _open_folder(folder: Path) -> CheckpointReader:
    config_path = folder / "config.json"
    config = _load_json(config_path) if config_path.is_file() else None
    if config is not None and not isinstance(config, dict):
        raise InputError("config.json is not a JSON object", where=str(config_path), fix="Fix the file.")
    index_path = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index_path.is_file():
        index = _load_json(index_path)
        weight_map_raw = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map_raw, dict) or not weight_map_raw:
            raise InputError("index has no 'weight_map' object", where=str(index_path),
                             fix="Re-download the checkpoint or remove the broken index.")
        weight_map: dict[str, Path] = {}
        for tensor, shard in weight_map_raw.items():
            if not isinstance(shard, str):
                raise InputError(f"index maps '{tensor}' to a non-string", where=str(index_path),
                                 fix="Fix the index.")
            if os.path.isabs(shard):
                raise InputError(f"index points tensor '{tensor}' to the absolute path '{shard}'",
                                 where=str(index_path),
                                 fix="Shards must be named by their file name inside the folder; fix the index.")
            # Checked on the name, not the resolved path: shards may be symlinks to elsewhere (the
            # Hugging Face cache links snapshots/<rev>/<shard> to blobs/<hash>).
            if Path(shard).name != shard:
                raise InputError(f"index points tensor '{tensor}' to '{shard}', which is not directly inside "
                                 "the checkpoint folder", where=str(index_path),
                                 fix="Shards must be files directly inside the folder; fix the index.")
            shard_path = (folder / shard).resolve()
            if not shard_path.is_file():
                raise InputError(f"index names shard '{shard}' (for '{tensor}') but it does not exist",
                                 where=str(index_path), fix="Re-download the missing shard.")
            weight_map[tensor] = shard_path
        files = sorted(set(weight_map.values()))
        return SafetensorsReader(folder, files, config, weight_map)
    if single.is_file():
        return SafetensorsReader(folder, [single.resolve()], config)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return open_checkpoint(ggufs[0])
    if (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        raise InputError("only pickle weights (pytorch_model.bin) found", where=str(folder),
                         fix="Pickle files can run code; convert to safetensors first "
                             "(model.save_pretrained(dir, safe_serialization=True)).")
    raise InputError("no model.safetensors, model.safetensors.index.json or .gguf file", where=str(folder),
                     fix="Point at a Hugging Face checkpoint folder, a .safetensors file or a .gguf file.")


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint for streaming (folder, .safetensors or .gguf); errors are InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", where=str(p), fix="Check the path.")
    if p.is_dir():
        return _open_folder(p)
    if not os.access(p, os.R_OK):
        raise InputError("file is not readable", where=str(p), fix="Check its permissions.")
    if p.suffix == ".gguf":
        return GGUFReader(p)
    if p.suffix == ".safetensors":
        config_path = p.parent / "config.json"
        config = _load_json(config_path) if config_path.is_file() else None
        return SafetensorsReader(p, [p.resolve()], config if isinstance(config, dict) else None)
    raise InputError(f"unknown file type '{p.suffix}'", where=str(p),
                     fix="Give a checkpoint folder, a .safetensors file or a .gguf file.")


def open_model(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open any checkpoint as float tensors: quantized layouts are dequantized tensor by tensor."""
    reader = open_checkpoint(path)
    fmt = format_of(reader)
    if fmt is None:
        return reader
    return DequantizingReader(reader, fmt)

