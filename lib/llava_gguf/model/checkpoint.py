"""Lazy, validated access to a Hugging Face style checkpoint folder.

`Checkpoint.open(folder)` reads only headers: the index (if any), each shard's tensor names,
dtypes and shapes. Tensors are loaded one at a time with `Checkpoint.load(name)`: safetensors
shards through `safe_open` (memory-mapped), `.bin` shards with
`torch.load(..., weights_only=True, mmap=True)` so that no pickle code runs and pages stay
file-backed. Every inconsistency is reported before any caller writes anything, naming the file.
The folder is only ever read.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

# safetensors dtype names, also used for .bin tensors so both formats read alike.
TORCH_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E8M0": 1,
               "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete, inconsistent or unsafe; the message names the file.
    `problem` is the message without its fix, for callers that know a better one."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str  # file name within the checkpoint folder
    dtype: str  # safetensors dtype name: BF16, F16, F32, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 4)


class Checkpoint:
    """Tensor metadata of every shard, with lazy loading of single tensors."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, TensorInfo], fmt: str, index_file: str | None):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.format = fmt
        self.index_file = index_file
        self._handles: dict[str, object] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: checkpoint folder not found (check params model.path)")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing; a checkpoint folder needs its config.json")
        config = read_json(config_file, "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: expected a JSON object of keys (the model's config.json), got a "
                                  f"{_json_kind(config)}; replace it with the checkpoint's own config.json")
        fmt, index_file, weight_map, shard_names = _find_shards(folder)
        tensors: dict[str, TensorInfo] = {}
        for shard in shard_names:
            for info in _read_shard_header(folder / shard, fmt):
                if info.name in tensors:
                    raise CheckpointError(
                        f"{folder / shard}: tensor '{info.name}' is also in {tensors[info.name].shard}; "
                        "a tensor must be stored once (mixed files from two downloads?)")
                tensors[info.name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in tensors:
                    raise CheckpointError(
                        f"{folder / index_file}: names tensor '{name}' in {shard}, but no shard holds it; "
                        "re-download the shard or the index")
                if tensors[name].shard != shard:
                    raise CheckpointError(
                        f"{folder / index_file}: places '{name}' in {shard}, but it is in "
                        f"{tensors[name].shard}; the index and the shards are from different versions")
        log.info("checkpoint %s: %d tensors in %d %s shard(s)", folder, len(tensors), len(shard_names), fmt)
        return cls(folder, config, tensors, fmt, index_file)

    # ------------------------------------------------------------------ access
    @property
    def shards(self) -> list[str]:
        return sorted({t.shard for t in self.tensors.values()})

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def load(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (never the whole shard into anonymous memory)."""
        info = self.tensors[name]
        handle = self._handle(info.shard)
        if self.format != "safetensors":
            return handle[name]

        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.path / info.shard}: tensor '{name}' cannot be read ({err}); "
                                  "the file changed or is damaged: re-download it") from None

    def _handle(self, shard: str):
        if shard not in self._handles:
            path = self.path / shard
            if self.format == "safetensors":
                self._handles[shard] = _safe_open(path)
            else:
                self._handles[shard] = _load_bin(path)
        return self._handles[shard]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def files(self) -> list[Path]:
        """Every file of the folder (for integrity checks: the source is never modified)."""
        return sorted(p for p in self.path.rglob("*") if p.is_file() and ".cache" not in p.parts)


# ---------------------------------------------------------------------- shard discovery
def _find_shards(folder: Path) -> tuple[str, str | None, dict | None, list[str]]:
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = index_weight_map(index)
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(
                        f"{folder / shard}: shard named by {index_name} is missing; the checkpoint is incomplete: "
                        "copy the file in, or download it again")
            return fmt, index_name, weight_map, shards
    for single, fmt in zip(SINGLE_FILES, ("safetensors", "bin")):
        if (folder / single).is_file():
            return fmt, None, None, [single]
    raise CheckpointError(f"{folder}: no weights found (expected {SAFETENSORS_INDEX}, {BIN_INDEX}, "
                          f"or a single {' / '.join(SINGLE_FILES)})")


def read_json(path: Path, what: str) -> object:
    """A JSON file of the checkpoint, or a CheckpointError naming it (binary junk included)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        problem = f"is not a text file (byte {err.object[err.start]:#04x} at offset {err.start} is not UTF-8)"
    except json.JSONDecodeError as err:
        problem = f"is not valid JSON ({err})"
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    problem = f"{path}: not a valid {what}: it {problem}"
    raise CheckpointError(f"{problem}; replace it with an intact copy (re-download it)", problem)


def _json_kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def index_weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard file map of a sharded checkpoint's index, validated."""
    data = read_json(index, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        problem = (f"{index}: not a valid index (it needs a non-empty 'weight_map' object of tensor name -> "
                   "shard file; a cut-off file or another tool's)")
        raise CheckpointError(f"{problem}; re-download it", problem)
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not v or "/" in v]
    if bad:
        problem = f"{index}: weight_map entries {', '.join(bad[:3])} do not name a shard file of the folder"
        raise CheckpointError(f"{problem}; re-download the index", problem)
    return weight_map


def _read_shard_header(path: Path, fmt: str) -> list[TensorInfo]:
    return _safetensors_header(path) if fmt == "safetensors" else _bin_header(path)


def _safetensors_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header); re-download it")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header length {header_len}); "
                                  "re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {_json_kind(header)}, not an object of "
                              "tensors); re-download it")
    header.pop("__metadata__", None)
    infos, data_end = [], 0
    for name, meta in header.items():
        problem = _header_entry_problem(meta)
        if problem:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor '{name}' {problem}; re-download it")
        begin, end = meta["data_offsets"]
        data_end = max(data_end, end)
        infos.append(TensorInfo(name, path.name, meta["dtype"], tuple(meta["shape"])))
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header promises {8 + header_len + data_end}); "
                              "copy or download the file again")
    _safe_open(path)  # whatever else safetensors itself refuses (overlapping or gapped data), named now
    return infos


def _header_entry_problem(meta: object) -> str | None:
    """What is wrong with one tensor's entry of a safetensors header (None: nothing)."""
    if not isinstance(meta, dict):
        return f"has a JSON {_json_kind(meta)} instead of {{dtype, shape, data_offsets}}"
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        return f"has no {', '.join(repr(k) for k in missing)}"
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in DTYPE_SIZES:
        return f"has dtype {dtype!r}, not a safetensors dtype this project reads ({', '.join(DTYPE_SIZES)})"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return f"has shape {shape!r}, not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"has data_offsets {offsets!r}, not [begin, end]"
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
        return (f"spans {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {numel * DTYPE_SIZES[dtype]}")
    return None


def _safe_open(path: Path):
    """safetensors' own reader of a shard; its refusal becomes a CheckpointError naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: safetensors cannot read it ({err}); re-download it") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files in the pre-1.6 (non-zip) format cannot be memory-mapped.
            log.warning("%s: legacy torch format, loading without mmap", path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests loading the file unsafely: only what the file asks for is kept.
        found = re.search(r"Unsupported (?:global|operand)[^:]*: (?:GLOBAL )?([\w.]+)", str(err))
        what = f" (it asks to call {found.group(1)} when loaded)" if found else ""
        raise CheckpointError(
            f"{path}: refused: the .bin holds objects other than tensors{what}. Loading it would run code "
            "from the file, so it is refused for safety; nothing in it was run. Use the safetensors "
            "version of the checkpoint (its *.safetensors files) instead."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt .bin shard ({err}); re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:3]} are not tensors; not a weights shard")
    return obj


def _bin_header(path: Path) -> list[TensorInfo]:
    state = _load_bin(path)
    return [TensorInfo(name, path.name, TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
            for name, t in state.items()]
