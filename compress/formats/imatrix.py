"""llama.cpp importance-matrix ("imatrix") files: read, write and convert both layouts.

An importance matrix holds, per weight matrix (llama.cpp tensor name, ``blk.0.attn_q.weight``), the mean
square of the activations entering each of its columns, gathered by ``llama-imatrix`` over a calibration
text; ``llama-quantize --imatrix`` turns it into one weight per column (:meth:`ImportanceMatrix.importance`)
that the quantizers use as ``quant_weights`` (:func:`compress.quant.ggml.quantize_ggml`'s ``importance``).

Two layouts, both written by ``tools/imatrix/imatrix.cpp`` and read by ``common/imatrix-loader.cpp``:

GGUF (the default since 2025; ``layout = "gguf"``): a GGUF file (version 3, alignment 32) with metadata

    general.type         string          "imatrix"
    imatrix.datasets     array[string]   the calibration files (possibly empty)
    imatrix.chunk_count  uint32          chunks processed
    imatrix.chunk_size   uint32          tokens per chunk (n_ctx / n_parallel)

and, per entry in sorted name order, two F32 tensors: ``<name>.in_sum2`` of ggml shape [n_per_row, n_mat]
(the raw sums of squared activations, per expert matrix for 3-D expert tensors, n_mat = 1 otherwise) and
``<name>.counts`` of ggml shape [1, n_mat] (the activation rows summed per matrix). llama-quantize's
importance is ``in_sum2 / lround(counts)`` per matrix in float32, or 1 where a matrix's count is 0; it
refuses a GGUF without the three ``imatrix.*`` keys ("missing imatrix metadata"), and so does
:func:`read_imatrix`.

Legacy ``.dat`` (``layout = "dat"``, ``llama-imatrix --output-format dat``), little-endian:

    int32 n_entries (>= 1)
    n_entries times, names sorted:  int32 len, len bytes name, int32 ncall, int32 nval, nval float32 values
    optional trailer:               int32 chunk count, int32 len, len bytes dataset name

where values = (sum / count) * ncall and ncall = ceil(max count / chunk_size), so llama-quantize's importance
is ``values / ncall`` in float32 (``values`` as stored when ncall <= 0).

In memory (:class:`ImportanceMatrix`) an entry keeps what its file stores: ``sums`` (in_sum2, or the .dat
values) and ``counts`` (the per-matrix counts, or ``[ncall]``). Conversion keeps every importance vector
bit for bit:

- .dat -> GGUF: sums = values, counts = [ncall] and chunk_size = 1 (a .dat records chunks, not tokens, so
  the GGUF counts chunks); its importance values / ncall is the same float32 division as the .dat's.
- GGUF -> .dat: llama-imatrix's ncall = ceil(max count / chunk_size) (max count when chunk_size is 0);
  values = sums when the entry is one matrix whose count is ncall (so .dat -> GGUF -> .dat gives back the
  same bytes), else llama-imatrix's values = importance * ncall when that divides back exactly for every
  value of the entry (it often does not: a product and a quotient round twice), else the largest power of
  two <= ncall in its place (always exact, and within 2x of the weight llama-imatrix gives the file when
  it merges imatrices), else (an overflow) ncall = 1 and values = importance.

The .dat trailer holds one dataset (llama.cpp writes the last one). Unlike llama-imatrix's .dat writer,
entries whose counts are all 0 are kept: their importance is all ones, which is what llama-quantize uses
for them when it reads the GGUF.

Every malformed, truncated or foreign file raises :class:`~compress.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np
import torch

from compress.errors import InputError
from compress.formats.gguf_scan import FIX_CORRUPT, FIX_TRUNCATED, open_gguf_package, scan_gguf

LAYOUTS = ("gguf", "dat")
KV_TYPE = "general.type"
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
FIX_IMATRIX = "Give an importance matrix written by llama-imatrix (.gguf or .dat)."
_F32 = 0  # ggml type id of F32


@dataclass(frozen=True, eq=False)
class ImatrixEntry:
    """One weight matrix's statistics, as its file stores them.

    sums: float32 [n_mat * n_per_row] -- GGUF: raw sums of squared activations, matrix-major (expert j's
      columns at ``j * n_per_row``); .dat: the stored values, (sum / count) * ncall.
    counts: float64 [n_mat] -- GGUF: activation rows per matrix (float32 in the file); .dat: ``[ncall]``
      (int32 in the file). float64 holds both exactly.
    """

    sums: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.sums.dim() != 1 or self.sums.dtype != torch.float32 or self.sums.numel() == 0:
            raise ValueError(f"sums must be a non-empty 1-D float32 tensor, got {self.sums.dtype} "
                             f"{tuple(self.sums.shape)}")
        if self.counts.dim() != 1 or self.counts.dtype != torch.float64 or self.counts.numel() == 0:
            raise ValueError(f"counts must be a non-empty 1-D float64 tensor, got {self.counts.dtype} "
                             f"{tuple(self.counts.shape)}")
        if self.sums.numel() % self.counts.numel():
            raise ValueError(f"{self.sums.numel()} sums do not split into {self.counts.numel()} matrices")

    @property
    def n_mat(self) -> int:
        """Matrices (experts) the sums cover: 1 for an ordinary weight, and always 1 in a .dat."""
        return self.counts.numel()

    @property
    def n_per_row(self) -> int:
        return self.sums.numel() // self.counts.numel()


@dataclass(frozen=True, eq=False)
class ImportanceMatrix:
    """A llama.cpp importance matrix: ``entries`` by llama.cpp tensor name, the chunks it was computed on, the
    calibration datasets, the tokens per chunk (0 when unknown: a .dat does not record it) and the layout its
    entries follow (``"gguf"`` or ``"dat"``, see the module docstring)."""

    entries: Mapping[str, ImatrixEntry]
    chunks: int = 0
    datasets: tuple[str, ...] = ()
    chunk_size: int = 0
    layout: str = "gguf"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.layout == "dat" and any(e.n_mat != 1 for e in self.entries.values()):
            raise ValueError("a .dat entry has exactly one count (its ncall)")

    def importance(self, name: str, columns: int | None = None) -> torch.Tensor:
        """The importance of entry ``name`` exactly as llama-quantize derives it when it loads the file
        (``load_imatrix`` in tools/quantize/quantize.cpp): float32 [n_mat * n_per_row], or [n, columns] when
        ``columns`` is given (one row per expert matrix; [1, columns] for an ordinary weight, whose row is
        :func:`~compress.quant.ggml.quantize_ggml`'s ``importance``). Raises KeyError for a missing entry and
        ValueError when the size is not a multiple of ``columns`` (llama.cpp refuses such a tensor)."""
        entry = self.entries[name]
        sums = entry.sums.numpy()
        if self.layout == "gguf":
            rounded = np.where(entry.counts.numpy() >= 0, np.floor(entry.counts.numpy() + 0.5),
                               np.ceil(entry.counts.numpy() - 0.5))  # std::lround of the float32 count
            count = rounded.astype(np.float32)  # (float) int64_t
            per_mat = sums.reshape(entry.n_mat, entry.n_per_row)
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(count[:, None] > 0, per_mat / count[:, None], np.float32(1.0)).astype(np.float32)
            out = out.reshape(-1)
        else:
            ncall = int(entry.counts[0])
            out = sums / np.float32(ncall) if ncall > 0 else sums.copy()  # float / int64_t: float32 division
        result = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        if columns is None:
            return result
        if columns <= 0 or result.numel() % columns:
            raise ValueError(f"importance of {name} has {result.numel()} values, not a multiple of {columns} "
                             f"columns")
        return result.reshape(-1, columns)

    def to_layout(self, layout: str) -> ImportanceMatrix:
        """The same importance vectors in the other layout (see the module docstring); self if already there."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == self.layout:
            return self
        entries: dict[str, ImatrixEntry] = {}
        for name, entry in self.entries.items():
            if layout == "gguf":  # .dat -> GGUF: values / ncall stays the same float32 division
                ncall = int(entry.counts[0])
                entries[name] = ImatrixEntry(entry.sums.clone(),
                                             torch.tensor([float(ncall) if ncall > 0 else 1.0], dtype=torch.float64))
            else:
                entries[name] = self._dat_entry(name, entry)
        return ImportanceMatrix(entries, chunks=self.chunks, datasets=self.datasets,
                                chunk_size=1 if layout == "gguf" else 0, layout=layout)

    def _dat_entry(self, name: str, entry: ImatrixEntry) -> ImatrixEntry:
        """GGUF entry -> .dat entry with the same importance (see the module docstring)."""
        counts = [int(np.floor(c + 0.5)) if c >= 0 else int(np.ceil(c - 0.5)) for c in entry.counts.tolist()]
        max_count = max(0, *counts)
        ncall = -(-max_count // self.chunk_size) if self.chunk_size > 0 else max_count
        ncall = min(max(ncall, 1), 2**31 - 1)
        if entry.n_mat == 1 and counts[0] == ncall:  # sums / ncall is already the importance's division
            values = entry.sums.numpy().copy()
        else:  # llama-imatrix's values = importance * ncall, if they divide back exactly; else a power of two
            importance = self.importance(name).numpy()
            for candidate in (ncall, 1 << (ncall.bit_length() - 1), 1):
                values = (importance * np.float32(candidate)).astype(np.float32)
                if np.array_equal(values / np.float32(candidate), importance):
                    ncall = candidate
                    break
        return ImatrixEntry(torch.from_numpy(values), torch.tensor([float(ncall)], dtype=torch.float64))

    def save(self, path: str | Path, layout: str | None = None) -> None:
        """:func:`write_imatrix`."""
        write_imatrix(self, path, layout)


# --- reading ----------------------------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read a llama.cpp importance matrix in either layout (GGUF when the file starts with ``GGUF``, as
    llama.cpp tries GGUF first and falls back to the legacy reader). Raises InputError on an unreadable,
    truncated, malformed or foreign file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", where=str(path),
                         fix="Check that the path exists and is readable.") from e
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> ImportanceMatrix:
    where = str(path)
    layout = scan_gguf(path)  # every offset and length checked: truncation is an InputError here
    file_type = layout.metadata.get(KV_TYPE)
    if file_type is not None and file_type != "imatrix":
        raise InputError(f"a GGUF file of general.type {file_type!r}, not an importance matrix", where=where,
                         fix=FIX_IMATRIX)
    names: dict[str, dict[str, str]] = {}
    for tensor in layout.tensors:
        for suffix in (SUM_SUFFIX, COUNT_SUFFIX):
            if tensor.endswith(suffix) and len(tensor) > len(suffix):
                names.setdefault(tensor[:-len(suffix)], {})[suffix] = tensor
    if not names:
        raise InputError(f"no '*{SUM_SUFFIX}' / '*{COUNT_SUFFIX}' tensors: not an importance matrix", where=where,
                         fix=FIX_IMATRIX)
    for name, parts in names.items():
        if len(parts) != 2:
            raise InputError(f"mismatched sums and counts for {name}", where=where, fix=FIX_CORRUPT)
        for tensor in parts.values():
            if layout.tensors[tensor][1] != _F32:
                raise InputError(f"tensor '{tensor}' is not F32", where=where, fix=FIX_CORRUPT)
    missing = [k for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE)
               if k not in layout.metadata and k not in layout.array_lengths]
    if missing:
        raise InputError(f"missing imatrix metadata ({', '.join(missing)}), which llama-quantize requires",
                         where=where, fix="Write it again with a recent llama-imatrix.")
    reader = open_gguf_package(path)
    fields = reader.fields
    datasets: tuple[str, ...] = ()
    ds = fields[KV_DATASETS]
    if ds.types and ds.types[0] == gguf.GGUFValueType.ARRAY and len(ds.types) > 1 \
            and ds.types[1] == gguf.GGUFValueType.STRING:
        datasets = tuple(str(s) for s in ds.contents())  # llama.cpp ignores a datasets key of another type
    scalars: dict[str, int] = {}
    for key in (KV_CHUNK_COUNT, KV_CHUNK_SIZE):
        f = fields[key]
        if f.types != [gguf.GGUFValueType.UINT32]:
            raise InputError(f"{key} is {'/'.join(t.name for t in f.types)}, not UINT32", where=where,
                             fix=FIX_CORRUPT)
        scalars[key] = int(f.contents())
    data = {t.name: t for t in reader.tensors}
    alignment = int(reader.alignment)
    for t in reader.tensors:  # llama.cpp reads each tensor's padding too: a file cut inside it is truncated
        end = int(t.data_offset) + (int(t.n_bytes) + alignment - 1) // alignment * alignment
        if end > layout.file_size:
            raise InputError(f"file ends inside the padding after tensor '{t.name}' ({layout.file_size} of {end} "
                             f"bytes)", where=where, fix=FIX_TRUNCATED)
    entries: dict[str, ImatrixEntry] = {}
    for name in sorted(names):
        sums = np.array(data[name + SUM_SUFFIX].data, dtype=np.float32).reshape(-1)
        counts = np.array(data[name + COUNT_SUFFIX].data, dtype=np.float32).reshape(-1)
        if counts.size == 0 or sums.size == 0 or sums.size % counts.size:
            raise InputError(f"{name}: {sums.size} sums do not split into {counts.size} matrices", where=where,
                             fix=FIX_CORRUPT)
        entries[name] = ImatrixEntry(torch.from_numpy(sums), torch.from_numpy(counts.astype(np.float64)))
    return ImportanceMatrix(entries, chunks=scalars[KV_CHUNK_COUNT], datasets=datasets,
                            chunk_size=scalars[KV_CHUNK_SIZE], layout="gguf")


class _Bytes:
    """Bounds-checked little-endian reads of a .dat file held in memory."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.where, self.pos = data, where, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InputError(f"file ends inside {what} (byte {self.pos} of {len(self.data)})", where=self.where,
                             fix=FIX_TRUNCATED)
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def int32(self, what: str) -> int:
        return int(struct.unpack("<i", self.take(4, what))[0])

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _read_dat(path: Path) -> ImportanceMatrix:
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", where=where,
                         fix="Check that the path exists and is readable.") from e
    cur = _Bytes(data, where)
    if len(data) < 4:
        raise InputError(f"file is {len(data)} bytes, too short for an importance matrix", where=where,
                         fix=FIX_TRUNCATED)
    n_entries = cur.int32("the entry count")
    # the smallest entry is 16 bytes (len, a 0-byte name, ncall, nval = 1 and one value)
    if n_entries < 1 or n_entries * 16 > cur.left:
        raise InputError(f"not an importance matrix: a GGUF or legacy .dat file was expected, and as .dat it "
                         f"would hold {n_entries} entries in {len(data)} bytes", where=where, fix=FIX_IMATRIX)
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        length = cur.int32(f"the name length of entry {i + 1}")
        if length < 0:
            raise InputError(f"entry {i + 1} has a name of {length} bytes", where=where, fix=FIX_IMATRIX)
        raw = cur.take(length, f"the name of entry {i + 1}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"the name of entry {i + 1} is not UTF-8 text", where=where, fix=FIX_IMATRIX) from None
        ncall = cur.int32(f"the call count of {name}")
        nval = cur.int32(f"the value count of {name}")
        if nval < 1:
            raise InputError(f"{name} has {nval} values", where=where, fix=FIX_IMATRIX)
        values = np.frombuffer(cur.take(4 * nval, f"the {nval} values of {name}"), dtype="<f4").astype(np.float32)
        if name in entries:
            raise InputError(f"entry {name} appears twice", where=where, fix=FIX_CORRUPT)
        entries[name] = ImatrixEntry(torch.from_numpy(values), torch.tensor([float(ncall)], dtype=torch.float64))
    chunks, datasets = 0, ()
    if cur.left:  # the optional trailer: chunk count, then the dataset name
        chunks = cur.int32("the chunk count")
        if cur.left:
            length = cur.int32("the dataset name length")
            if length > 0:
                raw = cur.take(length, "the dataset name")
                datasets = (raw.split(b"\0", 1)[0].decode("utf-8", errors="replace"),)
        if cur.left:
            raise InputError(f"{cur.left} unexpected bytes after the dataset name", where=where, fix=FIX_IMATRIX)
    return ImportanceMatrix(entries, chunks=chunks, datasets=datasets, chunk_size=0, layout="dat")


# --- writing ----------------------------------------------------------------------------------------------


def write_imatrix(imatrix: ImportanceMatrix, path: str | Path, layout: str | None = None) -> None:
    """Write ``imatrix`` to ``path`` as llama-imatrix does, in ``layout`` (``"gguf"`` or ``"dat"``; None: from
    the suffix, ``.gguf`` or ``.dat``, else the matrix's own layout), converting if needed (the importance
    vectors are kept bit for bit)."""
    path = Path(path)
    if layout is None:
        layout = {".gguf": "gguf", ".dat": "dat"}.get(path.suffix.lower(), imatrix.layout)
    data = imatrix.to_layout(layout)
    if layout == "dat":
        _write_dat(data, path)
    else:
        _write_gguf(data, path)


def _write_dat(imatrix: ImportanceMatrix, path: Path) -> None:
    """``IMatrixCollector::save_imatrix_legacy``'s bytes: entries in sorted name order, then the chunk count and
    the (last) dataset name."""
    out = bytearray(struct.pack("<i", len(imatrix.entries)))
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        raw = name.encode("utf-8")
        out += struct.pack("<i", len(raw)) + raw
        out += struct.pack("<ii", _int32(float(entry.counts[0])), entry.sums.numel())
        out += entry.sums.numpy().astype("<f4").tobytes()
    dataset = imatrix.datasets[-1].encode("utf-8") if imatrix.datasets else b""
    out += struct.pack("<ii", _int32(imatrix.chunks), len(dataset)) + dataset
    path.write_bytes(bytes(out))


def _int32(value: float) -> int:
    v = int(value)
    if not -2**31 <= v < 2**31:
        raise ValueError(f"{value} does not fit the .dat layout's int32")
    return v


def _write_gguf(imatrix: ImportanceMatrix, path: Path) -> None:
    """``IMatrixCollector::save_imatrix``'s file, through the ``gguf`` package: the four metadata keys in
    llama.cpp's order, then ``<name>.in_sum2`` and ``<name>.counts`` per entry in sorted name order, with
    ggml shapes [n_per_row, n_mat] and [1, n_mat] (trailing 1s dropped, as ggml writes them)."""
    writer = _ImatrixGGUFWriter(path, arch="")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix file names no architecture
    writer.add_string(KV_TYPE, "imatrix")
    writer.add_key_value(KV_DATASETS, list(imatrix.datasets), gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    writer.add_uint32(KV_CHUNK_COUNT, imatrix.chunks)
    writer.add_uint32(KV_CHUNK_SIZE, imatrix.chunk_size)
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        sums = entry.sums.numpy().astype(np.float32)
        counts = entry.counts.numpy().astype(np.float32)
        if entry.n_mat > 1:  # numpy order is ggml's reversed
            sums, counts = sums.reshape(entry.n_mat, entry.n_per_row), counts.reshape(entry.n_mat, 1)
        writer.add_tensor(name + SUM_SUFFIX, sums)
        writer.add_tensor(name + COUNT_SUFFIX, counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class _ImatrixGGUFWriter(gguf.GGUFWriter):  # type: ignore[misc]
    """gguf.GGUFWriter that can also write an empty typed array (llama-imatrix writes ``imatrix.datasets`` as an
    empty string array when it has no dataset name; the package refuses empty arrays)."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return bytes(head + self._pack("I", sub_type) + self._pack("Q", 0))
        return bytes(super()._pack_val(val, vtype, add_vtype, sub_type))


__all__ = ["LAYOUTS", "ImatrixEntry", "ImportanceMatrix", "read_imatrix", "write_imatrix"]
