"""The project's one GGUF reader: metadata values, the tensor table and memory-mapped tensor bytes.

gguf-py's `GGUFReader` makes a numpy view for every part of every array element, which takes
seconds for a 32000-token vocabulary. This reader decodes values with `struct` from a memory map;
`open_gguf` (`arrays=False`) does not even decode arrays, so the quantize table reads the header
of a 7B file in hundredths of a second. Tensor bytes are mapped only when `GGUFTensor.data` is read.
"""
from __future__ import annotations

import logging
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

_SCALARS = {
    gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d",
}
_FIX = "re-create it (rerun the step that made it with FORCE=1)"


class GGUFError(ValueError):
    """A file that should be a GGUF cannot be read as one (the message names the file and the fix);
    `problem` is what is wrong with it, e.g. "is truncated (...)"."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class _Unreadable(Exception):
    """What is wrong with the file, phrased to follow "<path>: <what>"."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows, columns), the reverse of GGUF's ne[]
    n_elements: int
    n_bytes: int
    offset: int  # of its data, from the start of the file
    path: Path = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """The raw bytes (uint8), memory-mapped."""
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.n_bytes,))

    def values(self) -> np.ndarray:
        """Dequantized to float32, in `shape`."""
        return gguf.quants.dequantize(self.data, self.qtype).reshape(self.shape)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, object]  # key -> value; read with arrays=False, an array is its length
    types: dict[str, tuple[gguf.GGUFValueType, ...]]  # key -> value type (ARRAY, item type, ...)
    tensors: dict[str, GGUFTensor]  # in file order

    @property
    def file_type(self) -> str | None:
        """The llama file type (Q5_K_M, F16, ...) from `general.file_type`; None when absent or unknown."""
        try:
            name = gguf.LlamaFileType(int(self.fields["general.file_type"])).name  # e.g. MOSTLY_Q5_K_M
        except (KeyError, ValueError, TypeError):
            return None
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf(path: Path | str, what: str = "GGUF file", *, arrays: bool = True, fix: str = _FIX) -> GGUFFile:
    """Metadata and tensor table of a GGUF, or a GGUFError naming the file (`what` says which) and
    the fix (`fix`: for a file the user supplied, not one a step made). `arrays=False` keeps each
    array value as its length (fast: no vocabulary decoding)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: {what} not found", "does not exist")
    try:
        return _parse(path, arrays)
    except _Unreadable as err:
        problem = str(err)
    except (OSError, struct.error, UnicodeDecodeError, ValueError, KeyError) as err:
        problem = f"is damaged and cannot be read ({type(err).__name__}: {err})"
    raise GGUFError(f"{path}: {what} {problem}; {fix}", problem) from None


def open_gguf(path: Path | str, what: str = "GGUF file", fix: str = _FIX) -> GGUFFile:
    """The header of a GGUF without decoding its arrays (`read_gguf(..., arrays=False)`)."""
    return read_gguf(path, what, arrays=False, fix=fix)


class _Cursor:
    def __init__(self, buf: mmap.mmap, arrays: bool):
        self.buf, self.pos, self.arrays = buf, 0, arrays

    def _advance(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise _Unreadable("is truncated (its header runs past the end of the file)")
        return start

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self._advance(struct.calcsize("<" + fmt)))
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("Q")
        start = self._advance(n)
        return self.buf[start:self.pos].decode("utf-8", errors="surrogateescape")

    def value_type(self) -> gguf.GGUFValueType:
        vtype = self.unpack("I")
        try:
            return gguf.GGUFValueType(vtype)
        except ValueError:
            raise _Unreadable(f"has an unknown metadata value type {vtype}") from None

    def value(self, vtype: gguf.GGUFValueType) -> tuple[tuple[gguf.GGUFValueType, ...], object]:
        if vtype == gguf.GGUFValueType.STRING:
            return (vtype,), self.string()
        if vtype != gguf.GGUFValueType.ARRAY:
            return (vtype,), self.unpack(_SCALARS[vtype])
        sub, n = self.value_type(), self.unpack("Q")
        if sub in _SCALARS:
            size = struct.calcsize(_SCALARS[sub])
            start = self._advance(n * size)
            items = list(struct.unpack_from(f"<{n}{_SCALARS[sub]}", self.buf, start)) if self.arrays else n
            return (vtype, sub), items
        if sub == gguf.GGUFValueType.STRING and not self.arrays:
            for _ in range(n):
                self._advance(self.unpack("Q"))
            return (vtype, sub), n
        parts = [self.value(sub) for _ in range(n)]
        sub_types = parts[0][0] if parts else (sub,)
        return (vtype, *sub_types), [v for _, v in parts] if self.arrays else n


def _parse(path: Path, arrays: bool) -> GGUFFile:
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise _Unreadable(f"is not a GGUF file (starts with {magic!r}, expected b'GGUF'; truncated, "
                              "an HTML error page or another format)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        cur = _Cursor(buf, arrays)
        cur.pos = 4
        version = cur.unpack("I")
        if version not in (2, 3):
            raise _Unreadable(f"has GGUF version {version} (only 2 and 3, little-endian, are read here)")
        n_tensors, n_kv = cur.unpack("QQ")
        fields, types = {}, {}
        for _ in range(n_kv):
            key = cur.string()
            types[key], fields[key] = cur.value(cur.value_type())
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
            infos.append((name, gguf.GGMLQuantizationType(cur.unpack("I")), tuple(reversed(dims)), cur.unpack("Q")))
        header_end, size = cur.pos, len(buf)
    align = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0:
        raise _Unreadable(f"has an invalid general.alignment {align!r}")
    start = -(-header_end // align) * align
    tensors, end = {}, header_end
    for name, qtype, shape, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape, dtype=np.int64))
        tensors[name] = t = GGUFTensor(name, qtype, shape, n, n // block * type_size, start + offset, path)
        end = max(end, t.offset + t.n_bytes)
    if size < end:
        raise _Unreadable(f"is truncated ({size} bytes, its tensor data ends at byte {end})")
    return GGUFFile(path, version, fields, types, tensors)


# ----------------------------------------------------------------------------- tables
def metadata_table(path: Path | str) -> pd.DataFrame:
    """The key/value metadata of a GGUF file (long arrays shortened), for display."""
    g = read_gguf(path)
    rows = []
    for key, value in g.fields.items():
        if isinstance(value, list) and len(value) > 6:
            value = f"[{', '.join(map(repr, value[:5]))}, ...] ({len(value)} items)"
        rows.append({"key": key, "type": "/".join(t.name for t in g.types[key]), "value": value})
    return pd.DataFrame(rows, columns=["key", "type", "value"])


def tensor_table(path: Path | str) -> pd.DataFrame:
    """The tensors of a GGUF file: name, type, shape (numpy order), elements, MiB."""
    rows = [{"name": t.name, "type": t.qtype.name, "shape": t.shape, "elements": t.n_elements,
             "MiB": t.n_bytes / 2**20} for t in open_gguf(path).tensors.values()]
    return pd.DataFrame(rows, columns=["name", "type", "shape", "elements", "MiB"])


# ----------------------------------------------------------------------------- summaries
# Written by llama-quantize when an importance matrix was used.
IMATRIX_KEY = "quantize.imatrix.file"


def quant_type_of(path: Path) -> str:
    """The quant type of a GGUF, from its file_type metadata, else from its file name."""
    try:
        ftype = open_gguf(path).file_type
        if ftype:
            return ftype
    except GGUFError as err:  # a partial or foreign file: fall back to the name
        log.debug("no file_type in %s: %s", path, err)
    m = re.search(r"(I?Q\d_[A-Z0-9_]+|F16|BF16|F32)", path.stem.upper())
    return m.group(1) if m else path.stem


def gguf_summary(path: Path | str) -> dict:
    """Size, parameter count, bits per weight, file type and tensor types of one GGUF."""
    path = Path(path)
    header = open_gguf(path)
    size = path.stat().st_size
    params = sum(t.n_elements for t in header.tensors.values())
    counts: Counter = Counter()
    by_bytes: Counter = Counter()
    for t in header.tensors.values():
        counts[t.qtype.name] += 1
        by_bytes[t.qtype.name] += t.n_bytes
    arch = header.fields.get("general.architecture", "")
    return {
        "file": path.name,
        "file_type": header.file_type or quant_type_of(path),
        "size_bytes": size,
        "size_mib": round(size / 2**20, 2),
        "params": params,
        # As llama.cpp reports it: tensor data bits over weights (metadata and vocab excluded).
        "bpw": round(8 * sum(by_bytes.values()) / params, 3) if params else float("nan"),
        "bpw_file": round(8 * size / params, 3) if params else float("nan"),
        "tensors": len(header.tensors),
        "architecture": arch,
        "layers": header.fields.get(f"{arch}.block_count"),
        "width": header.fields.get(f"{arch}.embedding_length"),
        "imatrix": IMATRIX_KEY in header.fields,
        "tensor_types": dict(sorted(counts.items())),
        "tensor_mib": {k: round(v / 2**20, 2) for k, v in sorted(by_bytes.items())},
    }


def quant_table(paths: dict[str, Path | str] | list[Path | str]) -> pd.DataFrame:
    """One row per GGUF: size, bits per weight and how many tensors of each ggml type it holds."""
    items = paths.items() if isinstance(paths, dict) else ((quant_type_of(Path(p)), p) for p in paths)
    rows = []
    for name, path in items:
        s = gguf_summary(path)
        row = {"variant": name, **{k: v for k, v in s.items() if k not in ("tensor_types", "tensor_mib")}}
        row.update({f"n_{k}": v for k, v in s["tensor_types"].items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    count_cols = sorted(c for c in table.columns if c.startswith("n_"))
    if count_cols:
        table[count_cols] = table[count_cols].fillna(0).astype(int)
    return table.sort_values("bpw", ascending=False, ignore_index=True) if len(table) else table


# ----------------------------------------------------------------------------- tools
