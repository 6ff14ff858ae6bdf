"""Writing checkpoints: a streaming safetensors shard writer and an atomic output folder.

The safetensors library writes a file from a dict of tensors held in memory. To keep peak memory
independent of model size we lay the shards out in advance (every output tensor's name, dtype
and shape is known from the plan), write each shard's header first, then append each tensor's
bytes as it is produced. The result is an ordinary safetensors file (the tests read it back with
``safetensors.safe_open``): 8-byte little-endian header length, JSON header padded with spaces to
a multiple of 8, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from compress.errors import OutputError

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as planned: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_names(n_shards: int) -> list[str]:
    if n_shards <= 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": TORCH_TO_SAFETENSORS[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Writes planned tensors, in plan order, into ``folder`` as safetensors shards (+ index).

    ``write(name, tensor)`` must be called once per planned tensor in the planned order; dtype and
    shape are checked against the plan so that a header can never lie about its data.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._file_index = -1

    def _open(self, index: int) -> BinaryIO:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / self.names[index], "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_header_bytes(self.shards[index], self.metadata))
        self._file_index = index
        return self._file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} was not planned")
        index, spec = self._queue[self._pos]
        if spec.name != name or spec.dtype != tensor.dtype or spec.shape != tuple(tensor.shape):
            raise RuntimeError(f"planned {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        f = self._file if index == self._file_index and self._file is not None else self._open(index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        self._pos += 1

    def abort(self) -> None:
        """Close the open file after an error (the caller discards the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pos != len(self._queue):
            raise RuntimeError(f"only {self._pos} of {len(self._queue)} planned tensors were written")
        if not self.shards:  # a checkpoint with no tensors still gets a valid (empty) file
            (self.folder / self.names[0]).write_bytes(_header_bytes([], self.metadata))
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for shard in self.shards for s in shard)},
                "weight_map": {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            write_json(self.folder / "model.safetensors.index.json", index)


def write_json(path: Path, obj: Any) -> None:
    """Deterministic, human-readable JSON (sorted keys would reorder configs, so keep insertion order),
    written to a temporary file beside ``path`` and renamed, so ``path`` is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_path(out: Path, *, force: bool, inputs: list[Path]) -> None:
    """Refuse outputs that would lose data: existing without --force, or overlapping an input."""
    out_abs = out.resolve()
    for src in inputs:
        src_abs = src.resolve()
        if out_abs == src_abs or out_abs in src_abs.parents or src_abs in out_abs.parents:
            raise OutputError(f"output {out} overlaps the input {src}", fix="Choose a different output path.")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} already exists", fix="Pass --force to replace it, or choose another path.")
        if not out.is_dir() or out.is_symlink():
            raise OutputError(f"output {out} exists and is not a folder",
                              fix="Remove it or choose another path (--force only replaces folders).")


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by rename.

    On any error the temporary folder, and the parent folders made for it, are removed and ``out``
    is left as it was.
    """
    parent = out.parent if str(out.parent) else Path(".")
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # innermost first
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {parent} ({e.strerror})",
                          fix="Choose an output path you can write to.") from e
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {parent} is not writable", fix="Choose an output path you can write to.")
    tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not force:  # appeared while we were working
                raise OutputError(f"output {out} already exists", fix="Pass --force to replace it.")
            backup = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        raise
