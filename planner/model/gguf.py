"""GGUF header reader (pure Python; ModelSpec from the header is in gguf_spec.py).

Layout (little-endian, GGUF v2/v3): magic b'GGUF', version u32, tensor_count u64,
kv_count u64, kv pairs (key string, value type u32, value), tensor infos (name string,
n_dims u32, dims u64 x n_dims, ggml type u32, data offset u64), padding to
`general.alignment`, tensor data. A string is a u64 byte length plus UTF-8 bytes.

The reader keeps at most one bounded buffer in memory and skips long arrays (tokenizer
tokens, scores, merges) by seeking, keeping only their element type and length.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from planner.errors import SpecError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT_BYTES = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
BUFFER_BYTES = 1 << 20  # read granularity and bound on buffered bytes (beyond one long string)
MAX_STRING_BYTES = 64 << 20  # longer strings mean a corrupt file, not a real chat template
MAX_ARRAY_ITEMS = 1024  # longer arrays are skipped; only their length is kept

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
F32_TYPE, BOOL_TYPE, STRING_TYPE, ARRAY_TYPE = 6, 7, 8, 9  # a bool is stored as one byte
# value type -> struct format character
_SCALAR_FORMATS = MappingProxyType({
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", BOOL_TYPE: "B", 10: "Q", 11: "q", 12: "d",
})
_SCALAR_STRUCTS = MappingProxyType({t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()})


@dataclass(frozen=True)
class GGMLType:
    """A tensor storage type: `block_bytes` bytes hold `block_weights` weights."""

    name: str
    block_weights: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_weights


# ggml type id -> layout (ggml.h / ggml.c type traits); scales and minima are included in
# block_bytes, so Q4_0 is 4.5 bits per weight and Q6_K 6.5625.
GGML_TYPES = MappingProxyType({t_id: GGMLType(name, weights, size) for t_id, name, weights, size in (
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292), (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66), (39, "MXFP4", 32, 17),
)})


@dataclass(frozen=True)
class SkippedArray:
    """An array longer than the reader keeps: its element type and length only."""

    elem_type: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `dims` are in GGML order: dims[0] is the contiguous (input)
    dimension, so a torch Linear weight [out, in] appears as (in, out)."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # bytes from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def n_bytes(self) -> int | None:
        """Stored bytes, or None for a type this reader does not know."""
        t = GGML_TYPES.get(self.ggml_type)
        return None if t is None else -(-self.n_elements // t.block_weights) * t.block_bytes


class _Reader:
    """Sequential little-endian reader over a file with one bounded buffer; skips seek."""

    def __init__(self, handle: BinaryIO, path: Path, size_bytes: int):
        self._handle, self._path, self.size_bytes = handle, path, size_bytes
        self._buf, self._pos, self._base = b"", 0, 0  # buffer, read position in it, its file offset
        self.where = "the header"  # what is being read, for error messages

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def corrupt(self, problem: str) -> SpecError:
        return SpecError(f"{self._path}: corrupt or unsupported GGUF file: {self.where} {problem}")

    def truncated(self, needed_bytes: int) -> SpecError:
        return SpecError(
            f"{self._path}: truncated GGUF file: reading {self.where} needs {needed_bytes} bytes at "
            f"offset {self.offset} but the file ends at byte {self.size_bytes}; it is incomplete or corrupt")

    def _ensure(self, n_bytes: int) -> None:
        available = len(self._buf) - self._pos
        if available >= n_bytes:
            return
        if self.offset + n_bytes > self.size_bytes:
            raise self.truncated(n_bytes)
        rest = self._buf[self._pos:]
        more = self._handle.read(max(n_bytes - available, BUFFER_BYTES))
        self._base, self._buf, self._pos = self.offset, rest + more, 0
        if len(self._buf) < n_bytes:
            raise self.truncated(n_bytes)

    def take(self, n_bytes: int) -> bytes:
        self._ensure(n_bytes)
        data = self._buf[self._pos:self._pos + n_bytes]
        self._pos += n_bytes
        return data

    def unpack(self, fmt: struct.Struct) -> tuple:
        self._ensure(fmt.size)
        values = fmt.unpack_from(self._buf, self._pos)
        self._pos += fmt.size
        return values

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def u64(self) -> int:
        return self.unpack(_U64)[0]

    def skip(self, n_bytes: int) -> None:
        if n_bytes <= len(self._buf) - self._pos:
            self._pos += n_bytes
            return
        target = self.offset + n_bytes
        if target > self.size_bytes:
            raise self.truncated(n_bytes)
        self._handle.seek(target)
        self._base, self._buf, self._pos = target, b"", 0

    def string(self) -> str:
        n_bytes = self.u64()
        if n_bytes > MAX_STRING_BYTES:
            raise self.corrupt(f"claims a string of {n_bytes} bytes at offset {self.offset}")
        return self.take(n_bytes).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self.skip(self.u64())


def _read_value(r: _Reader, value_type: int, max_items: int) -> object:
    if value_type in _SCALAR_STRUCTS:
        value = r.unpack(_SCALAR_STRUCTS[value_type])[0]
        if value_type == F32_TYPE:
            return _shortest_f32(value)
        return bool(value) if value_type == BOOL_TYPE else value
    if value_type == STRING_TYPE:
        return r.string()
    if value_type == ARRAY_TYPE:
        return _read_array(r, max_items)
    raise r.corrupt(f"has unknown value type {value_type}")


def _shortest_f32(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06)."""
    packed = _SCALAR_STRUCTS[F32_TYPE].pack(value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if _SCALAR_STRUCTS[F32_TYPE].pack(candidate) == packed:
            return candidate
    return value


def _read_array(r: _Reader, max_items: int) -> tuple | SkippedArray:
    elem_type, count = r.u32(), r.u64()
    if count <= max_items:
        if elem_type in _SCALAR_FORMATS and elem_type != BOOL_TYPE:
            fmt = struct.Struct(f"<{count}{_SCALAR_FORMATS[elem_type]}")
            return r.unpack(fmt)
        return tuple(_read_value(r, elem_type, max_items) for _ in range(count))
    _skip_values(r, elem_type, count)
    return SkippedArray(elem_type, count)


def _skip_values(r: _Reader, elem_type: int, count: int) -> None:
    if elem_type in _SCALAR_STRUCTS:
        r.skip(count * _SCALAR_STRUCTS[elem_type].size)
    elif elem_type == STRING_TYPE:
        r.skip_strings(count)
    elif elem_type == ARRAY_TYPE:
        for _ in range(count):
            inner_type, inner_count = r.u32(), r.u64()
            _skip_values(r, inner_type, inner_count)
    else:
        raise r.corrupt(f"has unknown array element type {elem_type}")


def _read_preamble(r: _Reader, path: Path) -> tuple[int, int, int]:
    if r.size_bytes < 4 or r.take(4) != GGUF_MAGIC:
        raise SpecError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    version = r.u32()
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise SpecError(f"{path}: big-endian GGUF files are not supported; "
                            "use a little-endian conversion")
        raise SpecError(f"{path}: GGUF version {version} is not supported (expected 2 or 3); "
                        "re-convert the model with a current llama.cpp")
    tensor_count, kv_count = r.u64(), r.u64()
    # a kv pair needs >= 13 bytes and a tensor info >= 24: reject absurd counts before looping
    if kv_count * 13 + tensor_count * 24 > r.size_bytes - r.offset:
        r.where = f"{kv_count} metadata entries and {tensor_count} tensor infos"  # counts are corrupt
        raise r.truncated(kv_count * 13 + tensor_count * 24)
    return version, tensor_count, kv_count


def read_gguf_header(path: str | Path, max_array_items: int = MAX_ARRAY_ITEMS) -> dict:
    """Parse the header of a GGUF v2/v3 file.

    Returns {'version', 'tensor_count', 'kv_count', 'metadata': {key: value},
    'tensors': tuple[TensorInfo, ...], 'data_offset': int}. Arrays longer than
    `max_array_items` come back as SkippedArray. Raises SpecError (one line) for a missing,
    non-GGUF, corrupt or truncated file, including one whose tensor data is cut short.
    """
    p = Path(path)
    if not p.is_file():
        problem = "is a directory, expected a GGUF file" if p.exists() else "file not found"
        raise SpecError(f"{p}: {problem}")
    with p.open("rb") as handle:
        r = _Reader(handle, p, os.fstat(handle.fileno()).st_size)
        version, tensor_count, kv_count = _read_preamble(r, p)
        metadata: dict[str, object] = {}
        for index in range(kv_count):
            r.where = f"metadata entry {index}"
            key = r.string()
            r.where = f"metadata key {key!r}"
            metadata[key] = _read_value(r, r.u32(), max_array_items)
        tensors = tuple(_read_tensor_info(r, index) for index in range(tensor_count))
        header_end = r.offset
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT_BYTES)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise SpecError(f"{p}: general.alignment must be a positive integer, got {alignment!r}")
    data_offset = -(-header_end // alignment) * alignment
    _check_data_present(p, r.size_bytes, data_offset, tensors)
    return {"version": version, "tensor_count": tensor_count, "kv_count": kv_count,
            "metadata": metadata, "tensors": tensors, "data_offset": data_offset}


def _read_tensor_info(r: _Reader, index: int) -> TensorInfo:
    r.where = f"tensor info {index}"
    name = r.string()
    r.where = f"tensor info {name!r}"
    n_dims = r.u32()
    if n_dims > MAX_DIMS:
        raise r.corrupt(f"claims {n_dims} dimensions (at most {MAX_DIMS})")
    dims = r.unpack(struct.Struct(f"<{n_dims}Q")) if n_dims else ()
    ggml_type, offset = r.u32(), r.u64()
    return TensorInfo(name, tuple(dims), ggml_type, offset)


def _check_data_present(path: Path, size_bytes: int, data_offset: int,
                        tensors: tuple[TensorInfo, ...]) -> None:
    """A download cut short keeps its header: check the last tensor's bytes are in the file."""
    ends = [(data_offset + t.offset + t.n_bytes, t.name) for t in tensors if t.n_bytes is not None]
    end_bytes, name = max(ends, default=(0, ""))
    if end_bytes > size_bytes:
        raise SpecError(f"{path}: truncated GGUF file: tensor {name!r} ends at byte {end_bytes} but the "
                        f"file has {size_bytes} bytes; the download is probably incomplete")
