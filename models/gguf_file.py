"""Checks a GGUF file before llama.cpp sees it.

llama.cpp answers a bad file with a vague "failed to load model" at best and
an abort at worst. This module reads the GGUF header, metadata and tensor
table in pure Python and says exactly what is wrong (missing, not GGUF, an
unsupported version, truncated, a tensor outside the file) in one line that
names the file. It needs nothing beyond the standard library, so it runs on
the device.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Guards against a corrupt length field making us allocate gigabytes.
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_ARRAY_ITEMS = 16 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_DIMS = 8

# ggml tensor types: id -> (name, elements per block, bytes per block).
# Mirrors ggml's type traits; ids that ggml has retired are left out.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# GGUF metadata value types: id -> struct format (None for string/array).
_SCALARS: dict[int, str] = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING = 8
_ARRAY = 9


class ModelFileError(ValueError):
    """A model file that cannot be used; the message is one line naming the file."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    nbytes: int


@dataclass
class GGUFSummary:
    """What the header says: enough to validate the file and describe a variant."""

    path: Path
    version: int
    metadata: dict[str, object]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def tensor_type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type_name for t in self.tensors).items()))

    @property
    def n_parameters(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path, size: int) -> None:
        self.fh = fh
        self.path = path
        self.size = size

    def read(self, n: int, what: str) -> bytes:
        pos = self.fh.tell()
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelFileError(
                self.path,
                f"truncated: the file ends at byte {self.size} while reading {what} "
                f"at byte {pos} ({n} bytes needed)",
            )
        return data

    def unpack(self, fmt: str, what: str) -> object:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.read(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack("<Q", self.read(8, what))[0]
        return value

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING_BYTES:
            raise ModelFileError(self.path, f"corrupt: {what} claims a length of {n} bytes")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(
                self.path, f"corrupt: {what} is not UTF-8 ({exc.reason})"
            ) from None

    def value(self, vtype: int, what: str) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            if count > MAX_ARRAY_ITEMS:
                raise ModelFileError(self.path, f"corrupt: {what} claims {count} items")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                raw = self.read(size * count, what)
                return list(struct.unpack(f"<{count}{fmt[1]}", raw))
            return [self.value(item_type, f"{what}[{i}]") for i in range(count)]
        raise ModelFileError(self.path, f"corrupt: {what} has unknown value type {vtype}")


def read_gguf(path: Path | str) -> GGUFSummary:
    """Parse and validate a GGUF file's header; raise ModelFileError if it is unusable."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "no such file")
    if not p.is_file():
        raise ModelFileError(p, "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise ModelFileError(p, "empty file (0 bytes)")
    try:
        fh = p.open("rb")
    except OSError as exc:
        raise ModelFileError(p, f"cannot open: {exc.strerror}") from None
    with fh:
        r = _Reader(fh, p, size)
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                p, f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})"
            )
        version = r.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(p, f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = r.u64("the tensor count")
        n_kv = r.u64("the metadata count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_ARRAY_ITEMS:
            raise ModelFileError(p, f"corrupt: header claims {n_tensors} tensors, {n_kv} keys")
        metadata: dict[str, object] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}")
            vtype = r.u32(f"type of metadata {key!r}")
            metadata[key] = r.value(vtype, f"metadata {key!r}")
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFileError(p, f"corrupt: general.alignment is {alignment!r}")

        raw_tensors: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = r.string(f"name of tensor #{i}")
            n_dims = r.u32(f"dimension count of tensor {name!r}")
            if not 0 < n_dims <= MAX_DIMS:
                raise ModelFileError(p, f"corrupt: tensor {name!r} has {n_dims} dimensions")
            shape = tuple(r.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
            ttype = r.u32(f"type of tensor {name!r}")
            offset = r.u64(f"offset of tensor {name!r}")
            raw_tensors.append((name, shape, ttype, offset))

        header_end = fh.tell()
        data_offset = (header_end + alignment - 1) // alignment * alignment
        tensors: list[TensorInfo] = []
        for name, shape, ttype, offset in raw_tensors:
            if ttype not in GGML_TYPES:
                raise ModelFileError(p, f"tensor {name!r} has unknown ggml type {ttype}")
            type_name, block, block_bytes = GGML_TYPES[ttype]
            n_elements = 1
            for d in shape:
                n_elements *= d
            if shape[0] % block:
                raise ModelFileError(
                    p, f"corrupt: tensor {name!r} row of {shape[0]} is not a multiple of "
                    f"the {type_name} block size {block}"
                )
            nbytes = n_elements // block * block_bytes
            end = data_offset + offset + nbytes
            if end > size:
                raise ModelFileError(
                    p,
                    f"truncated: tensor {name!r} needs bytes up to {end} but the file has "
                    f"{size} bytes ({end - size} missing)",
                )
            tensors.append(TensorInfo(name, shape, type_name, offset, nbytes))
    return GGUFSummary(p, version, metadata, tensors, data_offset, size)
