"""The structure of a GGUF file, checked before anything else reads it: magic, version, metadata, tensor
infos, every offset against the file size (:func:`scan_gguf`). Every problem is an :class:`InputError` with a
one-line message, so that a truncated or hand-edited file never reaches the ``gguf`` package's parser."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import InputError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf.GGUFReader reads (v1 counted with 32-bit integers)
GGML_MAX_DIMS = 4
MAX_ARRAY_NESTING = 8

# GGUF metadata value types: fixed-size scalars (struct code), string (8) and array (9).
_SCALAR_FORMATS: dict[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 4096  # numeric arrays up to this length are kept as lists in the metadata

FIX_TRUNCATED = "The file is truncated or corrupt; re-download it or convert it again with llama.cpp."
FIX_CORRUPT = "The file is corrupt; re-download it or convert it again with llama.cpp."
FIX_QTYPE = "Try `pip install -U gguf`, or convert the model with another quantization type."

# --- the file's structure --------------------------------------------------------------------------


@dataclass
class GGUFLayout:
    """What :func:`scan_gguf` learned from the header, every offset checked against the file size."""

    version: int
    metadata: dict[str, Any]  # scalars and strings; numeric arrays up to 4096 long as lists
    array_lengths: dict[str, int]  # every array-valued key -> its length (string arrays are not kept)
    # tensor name -> (GGUF dims, innermost first; ggml type id)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    data_start: int = 0
    file_size: int = 0


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, where: str) -> None:
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise InputError(f"file ends inside {what} (byte {self.pos} of {self.size})",
                             where=self.where, fix=FIX_TRUNCATED)
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{what} is not valid UTF-8 (byte {start})", where=self.where,
                             fix=FIX_CORRUPT) from e

    def value(self, vtype: int, key: str, depth: int = 0) -> tuple[Any, int | None]:
        """Read one metadata value; returns (value, array length or None). Big string arrays -> None."""
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], f"the value of '{key}'"), None
        if vtype == _STRING:
            n = self.unpack("Q", f"the length of the value of '{key}'")
            start = self.take(n, f"the value of '{key}'")
            return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace"), None
        if vtype != _ARRAY:
            raise InputError(f"metadata key '{key}' has unknown value type {vtype}", where=self.where,
                             fix=FIX_CORRUPT)
        if depth >= MAX_ARRAY_NESTING:
            raise InputError(f"metadata key '{key}' nests arrays deeper than {MAX_ARRAY_NESTING}",
                             where=self.where, fix=FIX_CORRUPT)
        etype = self.unpack("I", f"the array type of '{key}'")
        count = self.unpack("Q", f"the array length of '{key}'")
        if etype in _SCALAR_FORMATS:
            width = struct.calcsize("<" + _SCALAR_FORMATS[etype])
            start = self.take(count * width, f"the array '{key}' ({count} items)")
            if count <= _SMALL_ARRAY:
                return list(struct.unpack_from(f"<{count}{_SCALAR_FORMATS[etype]}", self.buf, start)), count
            return None, count
        min_item = {_STRING: 8, _ARRAY: 12}.get(etype)
        if min_item is None:
            raise InputError(f"metadata array '{key}' has unknown item type {etype}", where=self.where,
                             fix=FIX_CORRUPT)
        if count * min_item > self.size - self.pos:
            raise InputError(f"metadata array '{key}' claims {count} items, more than the file can hold",
                             where=self.where, fix=FIX_TRUNCATED)
        for _ in range(count):
            if etype == _STRING:
                n = self.unpack("Q", f"an item of the array '{key}'")
                self.take(n, f"an item of the array '{key}'")
            else:
                self.value(_ARRAY, key, depth + 1)
        return None, count


def scan_gguf(path: Path) -> GGUFLayout:
    """Walk a GGUF header without trusting it: magic, version, every metadata value, every tensor entry.

    Checks that each length and count fits in the file, that tensor types are known ggml types with
    whole blocks per row, and that each tensor's bytes lie inside the file -- what a truncated or
    hand-edited file gets wrong. Raises :class:`InputError`; reads no tensor data.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    where = str(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise InputError(f"file is {size} bytes, too short to be GGUF", where=where,
                                 fix=FIX_TRUNCATED)
            f.seek(0)
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise InputError(f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
                                 where=where, fix="Give a .gguf file written by llama.cpp.")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", where=where,
                         fix="Check that the path exists and is readable.") from e
    try:
        cur = _Cursor(buf, size, where)
        cur.pos = 4
        version = cur.unpack("I", "the version")
        if version not in GGUF_VERSIONS:
            if version & 0xFFFF == 0 and struct.unpack(">I", struct.pack("<I", version))[0] in GGUF_VERSIONS:
                raise InputError("GGUF file is big-endian, which is not supported", where=where,
                                 fix="Convert it again with llama.cpp on a little-endian machine.")
            raise InputError(f"GGUF version {version} is not supported (only {GGUF_VERSIONS})", where=where,
                             fix="Convert the model again with a recent llama.cpp.")
        tensor_count = cur.unpack("Q", "the tensor count")
        kv_count = cur.unpack("Q", "the metadata count")
        if kv_count * 13 > size - cur.pos or tensor_count * 24 > size - cur.pos:
            raise InputError(f"header claims {kv_count} metadata keys and {tensor_count} tensors, more than "
                             f"a {size}-byte file can hold", where=where, fix=FIX_CORRUPT)
        layout = GGUFLayout(version=version, metadata={}, array_lengths={}, file_size=size)
        for i in range(kv_count):
            key = cur.string(f"metadata key #{i}")
            if key in layout.metadata or key in layout.array_lengths:
                raise InputError(f"metadata key '{key}' appears twice", where=where, fix=FIX_CORRUPT)
            vtype = cur.unpack("I", f"the type of '{key}'")
            value, length = cur.value(vtype, key)
            if length is not None:
                layout.array_lengths[key] = length
            if value is not None:
                layout.metadata[key] = value
        alignment = layout.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise InputError(f"general.alignment is {alignment!r}, not a power of two", where=where,
                             fix=FIX_CORRUPT)
        entries: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(tensor_count):
            name = cur.string(f"the name of tensor #{i}")
            n_dims = cur.unpack("I", f"the rank of tensor '{name}'")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise InputError(f"tensor '{name}' has {n_dims} dimensions (ggml allows 1..{GGML_MAX_DIMS})",
                                 where=where, fix=FIX_CORRUPT)
            dims = tuple(cur.unpack("Q", f"the shape of tensor '{name}'") for _ in range(n_dims))
            ggml_type = cur.unpack("I", f"the type of tensor '{name}'")
            offset = cur.unpack("Q", f"the offset of tensor '{name}'")
            if name in layout.tensors:
                raise InputError(f"tensor '{name}' appears twice", where=where, fix=FIX_CORRUPT)
            try:
                qtype = GGMLQuantizationType(ggml_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise InputError(f"tensor '{name}' has unknown ggml type {ggml_type}", where=where,
                                 fix="The file is corrupt or newer than the installed gguf package; "
                                     "try `pip install -U gguf`.") from None
            if dims[0] % block:
                raise InputError(f"tensor '{name}' rows of {dims[0]} are not whole {qtype.name} blocks of "
                                 f"{block}", where=where, fix=FIX_CORRUPT)
            layout.tensors[name] = (dims, ggml_type)
            numel = 1
            for d in dims:
                numel *= d
            entries.append((name, dims, offset, numel // block * type_size))
        layout.data_start = (cur.pos + alignment - 1) // alignment * alignment
        for name, _dims, offset, nbytes in entries:
            end = layout.data_start + offset + nbytes
            if end > size:
                raise InputError(f"tensor '{name}' data ends at byte {end} but the file has {size} bytes",
                                 where=where, fix=FIX_TRUNCATED)
        return layout
    finally:
        buf.close()


def open_gguf_package(path: Path) -> Any:
    """``gguf.GGUFReader`` (memory-mapped), its exceptions turned into InputError."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", where=str(path),
                         fix="Check that the path exists and is readable.") from e
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error,
            UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"not a valid GGUF file ({msg})", where=str(path), fix=FIX_CORRUPT) from e


def dequantizable(qtype: Any) -> bool:
    """Whether ``gguf.quants.dequantize`` implements this ggml type."""
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    return isinstance(getattr(gguf.quants, qtype.name, None), type)
