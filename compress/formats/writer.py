"""Writing checkpoint folders: a streaming safetensors shard writer, and the folder sink built on it.

The safetensors library writes a file from a dict of tensors held in memory. To keep peak memory
independent of model size we lay the shards out in advance (every output tensor's name, dtype
and shape is known from the plan), write each shard's header first, then append each tensor's
bytes as it is produced. The result is an ordinary safetensors file (the tests read it back with
``safetensors.safe_open``): 8-byte little-endian header length, JSON header padded with spaces to
a multiple of 8, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from compress.formats.output import OutputFolder, write_json
from compress.formats.sink import Encoded, Sink, encode

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
        self.closed = False

    def _open(self, index: int) -> BinaryIO:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / self.names[index], "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_header_bytes(self.shards[index], self.metadata))
        self._file_index = index
        return self._file

    def write(self, name: str, tensor: torch.Tensor | Encoded) -> None:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} was not planned")
        index, spec = self._queue[self._pos]
        encoded = tensor if isinstance(tensor, Encoded) else encode(tensor)
        if (spec.name != name or encoded.dtype != str(spec.dtype).removeprefix("torch.")
                or spec.shape != encoded.shape or encoded.nbytes != spec.nbytes):
            raise RuntimeError(f"planned {spec}, got {name} {encoded.dtype} {encoded.shape} ({encoded.nbytes} bytes)")
        f = self._file if index == self._file_index and self._file is not None else self._open(index)
        f.write(memoryview(encoded.array()))
        self._pos += 1

    def abort(self) -> None:
        """Close the open file after an error (the caller discards the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self.closed = True
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


class FolderSink(Sink):
    """A checkpoint folder: the declared tensors as safetensors shards in a staged folder (``folder``), where
    the caller also puts config.json and the other files; :meth:`commit` renames it into place."""

    def __init__(self, out: Path, *, force: bool, specs: list[TensorSpec], shard_bytes: int) -> None:
        self.staging = OutputFolder(out, force=force).__enter__()
        self.folder = self.staging.path
        self.bytes = sum(s.nbytes for s in specs)
        try:
            self.writer = ShardedWriter(self.folder, specs, shard_bytes)
        except BaseException:
            self.staging.abort()
            raise

    def write(self, name: str, tensor: Encoded) -> None:
        self.writer.write(name, tensor)

    def close_weights(self) -> None:
        """Finish the shards and the index (the folder's other files may still be added)."""
        self.writer.close()

    def commit(self) -> None:
        if not self.writer.closed:
            self.writer.close()
        self.staging.commit()
        self.committed = True

    def abort(self) -> None:
        self.writer.abort()
        self.staging.abort()


def write_model_files(folder: Path, config: dict[str, Any] | None, extra_files: dict[str, bytes | Path]) -> None:
    """The non-weight files of a checkpoint folder: config.json (when given) and the files carried over from
    the input (tokenizer, generation config, ...: name -> content or source path)."""
    if config is not None:
        write_json(folder / "config.json", config)
    for name, source in extra_files.items():
        (folder / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
