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
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

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
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete, inconsistent or unsafe; the message names the file."""


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
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
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
        if self.format == "safetensors":
            return handle.get_tensor(name)
        return handle[name]

    def _handle(self, shard: str):
        if shard not in self._handles:
            path = self.path / shard
            if self.format == "safetensors":
                from safetensors import safe_open

                self._handles[shard] = safe_open(str(path), framework="pt")
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map'): {err}") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(
                        f"{folder / shard}: shard named by {index_name} is missing; resume the download "
                        "(make download) or copy the file in")
            return fmt, index_name, weight_map, shards
    for single, fmt in zip(SINGLE_FILES, ("safetensors", "bin")):
        if (folder / single).is_file():
            return fmt, None, None, [single]
    raise CheckpointError(f"{folder}: no weights found (expected {SAFETENSORS_INDEX}, {BIN_INDEX}, "
                          f"or a single {' / '.join(SINGLE_FILES)})")


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
    header.pop("__metadata__", None)
    infos, data_end = [], 0
    for name, meta in header.items():
        begin, end = meta["data_offsets"]
        data_end = max(data_end, end)
        infos.append(TensorInfo(name, path.name, meta["dtype"], tuple(meta["shape"])))
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header promises {8 + header_len + data_end}); "
                              "resume or redo the download")
    return infos


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
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors (a pickle that could run code when "
            f"loaded unsafely); nothing in it was run. Use a safetensors copy of the checkpoint. ({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt .bin shard ({err}); re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:3]} are not tensors; not a weights shard")
    return obj


def _bin_header(path: Path) -> list[TensorInfo]:
    state = _load_bin(path)
    return [TensorInfo(name, path.name, TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
            for name, t in state.items()]
