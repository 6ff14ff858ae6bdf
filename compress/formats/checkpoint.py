"""Reading checkpoints one tensor at a time.

Every reader yields the same thing: an ordered list of :class:`TensorInfo` (known without loading
any data) and ``get(name)`` returning one tensor. Nothing here loads a whole model, so the caller
decides how many tensors are alive at once.

Safetensors files are validated twice at open (our own bounds checks, then
``safetensors.safe_open``), but tensors are read with plain positioned reads into a fresh buffer
rather than copied out of the library's memory map: pages of a map that were touched stay
resident (and count in RSS) until the map is dropped, so streaming a 4 GB checkpoint through the
map peaked at 4.7 GB RSS, and through reads at under 1 GB (reports/bench_quantize.md).

Supported inputs (see :func:`compress.formats.inputs.open_checkpoint`):

- a Hugging Face checkpoint folder: ``config.json`` plus ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``;
- a single ``.safetensors`` file;
- a ``.gguf`` file (llama.cpp), dequantized and renamed to Hugging Face names
  (:mod:`compress.formats.gguf_reader`).
"""

from __future__ import annotations

import json
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import InputError

# safetensors dtype names -> torch dtypes (the subset torch can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip

# Files of a checkpoint folder that are weights or weight indexes; everything else that is a plain
# file (tokenizer, generation config, chat template, README, ...) is copied to the output as-is.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Our own per-run files: they describe one run and are never carried into another run's output.
RUN_FILES = ("report.json", "report.md", "compress_provenance.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a stored tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path  # the file that holds it (for messages)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def weight_file_bytes(reader: CheckpointReader) -> int:
    """The size on disk of the files that hold the checkpoint's tensors (safetensors shards, the GGUF file): the one
    definition of a model's size that quantize, inspect and the reports use."""
    files = {Path(i.file) for i in reader.infos()}
    return sum(f.stat().st_size for f in files if f.is_file())


def folder_weight_bytes(folder: Path) -> int:
    """The size on disk of a written folder's weight files (``*.safetensors``)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class CheckpointReader(ABC):
    """A checkpoint opened for streaming. Use as a context manager."""

    path: Path
    config: dict[str, Any] | None

    @abstractmethod
    def infos(self) -> list[TensorInfo]:
        """All tensors in storage order."""

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a CPU copy that the caller owns)."""

    def extra_files(self) -> dict[str, bytes | Path]:
        """Non-weight files to ship beside the weights: output name -> source path or content."""
        return {}

    def report_row(self, name: str) -> Any | None:
        """A report row this reader made while producing tensor ``name`` (a merge makes one), else None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        for info in self.infos():
            yield info, self.get(info.name)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and bounds-check a safetensors header without trusting it.

    Checks what a truncated or hand-edited file gets wrong: the 8-byte length, the JSON, the dtype
    names, that every tensor's byte range matches its shape and dtype, that ranges are contiguous
    and that the data the header promises is really in the file.
    """
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(
                    f"file is {size} bytes, too short to be safetensors", where=where,
                    fix="The file is truncated or not a safetensors file; re-download or re-export it.",
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                problem = (f"only {size - 8} follow its 8-byte length" if 8 + header_len > size
                           else f"the limit is {MAX_HEADER_BYTES}")
                raise InputError(
                    f"header claims {header_len} bytes but {problem}", where=where,
                    fix="The file is truncated or corrupt; re-download or re-export it.",
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror})", where=where,
                         fix="Check that the path exists and is readable.") from e
    try:
        header = json.loads(raw.decode("utf-8"))  # the format says UTF-8 (json.loads(bytes) would guess)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"header is not valid JSON ({e})", where=where,
                         fix="The file is corrupt; re-download or re-export it.") from e
    if not isinstance(header, dict):
        raise InputError("header is not a JSON object", where=where, fix="The file is corrupt.")
    data_len = size - 8 - header_len
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise InputError(f"tensor '{name}' has a malformed header entry", where=where,
                             fix="The file is corrupt; re-download or re-export it.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise InputError(f"tensor '{name}' has unknown dtype {dtype!r}", where=where,
                             fix="The file is corrupt or from a newer safetensors version.")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise InputError(f"tensor '{name}' has a malformed shape or offsets", where=where,
                             fix="The file is corrupt; re-download or re-export it.")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != numel * DTYPE_SIZES[dtype]:
            raise InputError(
                f"tensor '{name}' header says offsets {begin}..{end} but shape {shape} of {dtype} "
                f"needs {numel * DTYPE_SIZES[dtype]} bytes", where=where,
                fix="The header is corrupt; re-download or re-export the file.",
            )
        ranges.append((begin, end, name))
    ranges.sort()
    cursor = 0
    for begin, end, name in ranges:
        if begin != cursor:
            raise InputError(f"tensor '{name}' data starts at byte {begin}, expected {cursor}",
                             where=where, fix="The header is corrupt; re-download or re-export the file.")
        cursor = end
    if cursor > data_len:
        raise InputError(
            f"header promises {cursor} bytes of tensor data but the file holds {data_len}",
            where=where, fix="The file is truncated; re-download or re-export it.",
        )
    return header


class SafetensorsReader(CheckpointReader):
    """One or more safetensors files (a single file, or the shards of a folder)."""

    def __init__(self, path: Path, files: list[Path], config: dict[str, Any] | None,
                 weight_map: dict[str, Path] | None = None) -> None:
        from safetensors import safe_open

        self.path = path
        self.config = config
        self._infos: list[TensorInfo] = []
        self._file_of: dict[str, Path] = {}
        self._offset_of: dict[str, int] = {}  # absolute byte offset of each tensor's data
        self.warnings: list[str] = []  # odd but readable: the plan shows them
        owners: dict[str, list[Path]] = {}
        for file in files:
            header = read_safetensors_header(file)
            try:  # the library's own checks; the handle is not kept (see the module docstring)
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as e:
                raise InputError(f"cannot open as safetensors ({e})", where=str(file),
                                 fix="The file is corrupt; re-download or re-export it.") from e
            with open(file, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            entries = sorted(((v["data_offsets"][0], k, v) for k, v in header.items()
                              if k != "__metadata__"), key=lambda t: t[0])
            for _, name, entry in entries:
                owners.setdefault(name, []).append(file)
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index decides which shard owns a name
                if name in self._file_of:
                    raise InputError(f"tensor '{name}' appears in two shards", where=str(file),
                                     fix="Fix model.safetensors.index.json so each tensor has one shard.")
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise InputError(f"tensor '{name}' has dtype {entry['dtype']}, which torch cannot load",
                                     where=str(file), fix="Convert the checkpoint to a float dtype first.")
                self._file_of[name] = file
                self._offset_of[name] = data_start + entry["data_offsets"][0]
                self._infos.append(TensorInfo(name, tuple(entry["shape"]),
                                              SAFETENSORS_DTYPES[entry["dtype"]], file))
        twice = [n for n, f in owners.items() if len(f) > 1 and n in self._file_of]
        if twice:
            name = twice[0]
            self.warnings.append(f"{len(twice)} tensors are stored in more than one shard (first: '{name}' in "
                                 f"{', '.join(f.name for f in owners[name])}); the index's choice was read "
                                 f"({self._file_of[name].name}) and the other copies ignored")
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise InputError(
                    f"index lists tensor '{missing[0]}' in {weight_map[missing[0]].name} but that shard "
                    f"does not contain it ({len(missing)} such tensors)", where=str(path),
                    fix="The index and the shards disagree; re-download the checkpoint.",
                )
        self._info_index = {i.name: i for i in self._infos}
        self._extra = _extra_files(path) if path.is_dir() else {}

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise KeyError(name)
        info = self._info_index[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if out.numel() == 0:
            return out
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        try:
            with open(file, "rb") as f:
                f.seek(self._offset_of[name])
                got = f.readinto(buffer)
        except OSError as e:
            raise InputError(f"cannot read tensor '{name}' ({e.strerror})", where=str(file),
                             fix="Check that the file is readable.") from e
        if got != info.nbytes:
            raise InputError(f"tensor '{name}' ends {info.nbytes - got} bytes past the end of the file",
                             where=str(file), fix="The file is truncated; re-download or re-export it.")
        return out


    def extra_files(self) -> dict[str, bytes | Path]:
        return dict(self._extra)



def _extra_files(folder: Path) -> dict[str, bytes | Path]:
    """Plain files of a checkpoint folder that are not weights (tokenizer, generation config...)."""
    out: dict[str, bytes | Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if (p.name.endswith(WEIGHT_FILE_SUFFIXES) or p.name in WEIGHT_INDEX_NAMES or p.name in RUN_FILES
                or p.name == "config.json"):
            continue
        out[p.name] = p
    return out
