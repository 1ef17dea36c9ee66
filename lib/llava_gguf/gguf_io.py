"""A fast read-only view of a GGUF file: metadata values and memory-mapped tensor bytes.

gguf-py's `GGUFReader` makes a numpy view for every part of every array element, which takes
seconds for a 32000-token vocabulary; comparing files key by key needs only the decoded values.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_SCALARS = {
    gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows, columns), the reverse of GGUF's ne[]
    data: np.ndarray  # raw bytes (uint8), memory-mapped

    def values(self) -> np.ndarray:
        """Dequantized to float32, in `shape`."""
        return gguf.quants.dequantize(self.data, self.qtype).reshape(self.shape)


@dataclass(frozen=True)
class GGUFContents:
    path: Path
    fields: dict[str, tuple[tuple[gguf.GGUFValueType, ...], object]]  # key -> (value types, value)
    tensors: dict[str, GGUFTensor]  # in file order


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("Q")
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: gguf.GGUFValueType) -> tuple[tuple[gguf.GGUFValueType, ...], object]:
        if vtype == gguf.GGUFValueType.STRING:
            return (vtype,), self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            sub, n = gguf.GGUFValueType(self.unpack("I")), self.unpack("Q")
            if sub in _SCALARS:
                fmt = _SCALARS[sub]
                items = list(struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos))
                self.pos += n * struct.calcsize(fmt)
                return (vtype, sub), items
            parts = [self.value(sub) for _ in range(n)]
            sub_types = parts[0][0] if parts else (sub,)
            return (vtype, *sub_types), [v for _, v in parts]
        return (vtype,), self.unpack(_SCALARS[vtype])


def read_gguf(path: Path | str) -> GGUFContents:
    path = Path(path)
    with open(path, "rb") as f:
        cur = _Cursor(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    magic, version, n_tensors, n_kv = cur.unpack("IIQQ")
    if magic != gguf.GGUF_MAGIC or version < 2:
        raise ValueError(f"{path}: not a GGUF v2/v3 file")
    fields = {}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = cur.value(gguf.GGUFValueType(cur.unpack("I")))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
        infos.append((name, gguf.GGMLQuantizationType(cur.unpack("I")), tuple(reversed(dims)), cur.unpack("Q")))
    align = fields.get("general.alignment", (None, gguf.GGUF_DEFAULT_ALIGNMENT))[1]
    start = -(-cur.pos // align) * align
    raw = np.memmap(path, mode="r", dtype=np.uint8)
    tensors = {}
    for name, qtype, shape, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
        tensors[name] = GGUFTensor(name, qtype, shape, raw[start + offset:start + offset + nbytes])
    cur.buf.close()
    return GGUFContents(path, fields, tensors)
