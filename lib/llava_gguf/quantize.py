"""Step 05: quantize the text GGUF with `llama-quantize`, one file per type in `quantize.types`.

Only the text model is quantized; the mmproj stays as exported (llama.cpp runs the CLIP encoder
from F16/F32 and small vision towers lose accuracy fast under quantization).

With `quantize.imatrix: true` an importance matrix is computed first by `llama-imatrix` over
the calibration corpus (`corpus.corpus_path("calibration")`, disjoint from the text KLD is
measured on) and passed to every quantization.

Outputs go to `outputs/<run>/models/<stem>-<TYPE>.gguf`, where <stem> is the text GGUF's name
without its float suffix (`-f16`). llama-quantize writes straight to the path it is given, so it
is given a temporary name that is renamed when the tool succeeded. A file already there is reused
when it is newer than the text GGUF and its metadata says the same type and imatrix use.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import corpus, toolchain
from .download import quant_type_of
from .workspace import Run, atomic_path, resolve

log = logging.getLogger(__name__)

# Suffixes that name the float type of an unquantized export; dropped before adding the quant type.
_FLOAT_SUFFIX = re.compile(r"[-_.](f16|bf16|f32|q8_0)$", re.I)
# Metadata key llama-quantize writes when it used an importance matrix.
IMATRIX_KEY = "quantize.imatrix.file"


class GGUFError(ValueError):
    """A file that should be a GGUF cannot be read as one."""


@dataclass
class QuantizeResult:
    quantized: dict[str, Path]
    table: pd.DataFrame
    imatrix: Path | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"QuantizeResult({', '.join(f'{k}: {Path(v).name}' for k, v in self.quantized.items())}; "
                f"imatrix {self.imatrix}; reused {self.reused})")


def open_gguf(path: Path | str, what: str = "GGUF file") -> "GGUFHeader":
    """The header of a GGUF (metadata and tensor table), or a GGUFError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: {what} not found")
    try:
        return _read_header(path)
    except GGUFError as err:
        raise GGUFError(f"{path}: {what} {err}; re-create it (rerun the step that made it with FORCE=1)") from None
    except (OSError, struct.error, UnicodeDecodeError, ValueError, KeyError) as err:
        raise GGUFError(f"{path}: {what} is damaged and cannot be read ({type(err).__name__}: {err}); "
                        "re-create it (rerun the step that made it with FORCE=1)") from None


@dataclass
class GGUFTensor:
    name: str
    type: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int


@dataclass
class GGUFHeader:
    """What a GGUF says about itself, without its data. Array values are kept as their length only."""

    version: int
    fields: dict[str, object]
    tensors: list[GGUFTensor]


# GGUF value types -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_header(path: Path) -> GGUFHeader:
    """A minimal GGUF header parser: gguf-py's reader takes seconds on a 32000-entry vocab."""
    import gguf

    with open(path, "rb") as f:
        def unpack(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise GGUFError("is truncated (the header ends early)")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            n = unpack("Q")
            if n > 1 << 24:
                raise GGUFError(f"has an implausible string length {n} in its header")
            return f.read(n).decode("utf-8")

        def value(vtype: int):
            if vtype in _SCALARS:
                return unpack(_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                item, n = unpack("I"), unpack("Q")
                if item == 8:
                    for _ in range(n):
                        f.seek(unpack("Q"), 1)
                elif item in _SCALARS:
                    f.seek(n * struct.calcsize(_SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return n
            raise GGUFError(f"has an unknown metadata value type {vtype}")

        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"is not a GGUF file (starts with {magic!r}, expected b'GGUF'; truncated, "
                            "an HTML error page or another format)")
        version = unpack("I")
        if version not in (2, 3):
            raise GGUFError(f"has GGUF version {version} (only 2 and 3, little-endian, are read here)")
        n_tensors, n_kv = unpack("Q"), unpack("Q")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(unpack("I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(unpack("Q") for _ in range(unpack("I")))
            ttype = gguf.GGMLQuantizationType(unpack("I"))
            unpack("Q")  # data offset: not needed
            n = 1
            for d in shape:
                n *= d
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            tensors.append(GGUFTensor(name, ttype.name, shape, n, n // block * type_size))
        data_start = f.tell()
    needed = sum(t.n_bytes for t in tensors)
    if path.stat().st_size < data_start + needed:
        raise GGUFError(f"is truncated ({path.stat().st_size} bytes, its tensors need at least "
                        f"{data_start + needed})")
    return GGUFHeader(version, fields, tensors)


def output_stem(text_gguf: Path) -> str:
    return _FLOAT_SUFFIX.sub("", text_gguf.stem)


def threads(run: Run) -> int:
    return run.params.quantize.threads or os.cpu_count() or 2


# ----------------------------------------------------------------------------- tables
def gguf_summary(path: Path | str) -> dict:
    """Size, parameter count, bits per weight, file type and tensor types of one GGUF."""
    path = Path(path)
    header = open_gguf(path)
    size = path.stat().st_size
    params = sum(t.n_elements for t in header.tensors)
    counts: Counter = Counter()
    by_bytes: Counter = Counter()
    for t in header.tensors:
        counts[t.type] += 1
        by_bytes[t.type] += t.n_bytes
    arch = header.fields.get("general.architecture", "")
    return {
        "file": path.name,
        "file_type": file_type(header) or quant_type_of(path),
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


def file_type(header: GGUFHeader) -> str | None:
    """The llama file type (Q5_K_M, F16, ...) from `general.file_type`, None when absent."""
    import gguf

    try:
        return gguf.LlamaFileType(int(header.fields["general.file_type"])).name \
            .removeprefix("MOSTLY_").removeprefix("ALL_")
    except (KeyError, ValueError):
        return None


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
def compute_imatrix(run: Run, text_gguf: Path) -> Path:
    """The importance matrix of the text model over the calibration corpus (reused when newer)."""
    q = run.params.quantize
    ctx = q.imatrix_ctx
    calib = corpus.corpus_path("calibration")
    out = run.sub("models") / f"{output_stem(text_gguf)}-imatrix-c{ctx}x{q.imatrix_chunks}.gguf"
    if out.exists() and out.stat().st_mtime >= max(text_gguf.stat().st_mtime, calib.stat().st_mtime):
        log.info("reusing importance matrix %s", out)
        return out
    tool = toolchain.find_tool("llama-imatrix", run.params.llama_cpp.dir)
    with atomic_path(out, suffix=".gguf") as tmp:
        log.info("computing importance matrix over %d chunks of %d tokens of %s", q.imatrix_chunks, ctx, calib.name)
        toolchain.run_tool([tool, "-m", text_gguf, "-f", calib, "-o", tmp, "-c", ctx, "--chunks",
                            q.imatrix_chunks, "-t", threads(run)], run.sub("logs") / "imatrix.log",
                           what="llama-imatrix")
        open_gguf(tmp, "importance matrix")
    return out


def quantize_file(run: Run, text_gguf: Path, qtype: str, imatrix: Path | None = None) -> tuple[Path, bool]:
    """Quantize `text_gguf` to `qtype`; returns (path, reused)."""
    out = run.sub("models") / f"{output_stem(text_gguf)}-{qtype}.gguf"
    if _up_to_date(out, text_gguf, qtype, imatrix):
        return out, True
    tool = toolchain.find_tool("llama-quantize", run.params.llama_cpp.dir)
    extra = ["--imatrix", imatrix] if imatrix else []
    with atomic_path(out, suffix=".gguf") as tmp:
        toolchain.run_tool([tool, *extra, text_gguf, tmp, qtype, threads(run)],
                           run.sub("logs") / f"quantize-{qtype}.log", what=f"llama-quantize {qtype}")
        got = gguf_summary(tmp)["file_type"]
        if got != qtype:
            raise GGUFError(f"{tmp}: llama-quantize wrote file type {got}, asked for {qtype}; "
                            f"see {run.sub('logs') / f'quantize-{qtype}.log'}")
    return out, False


def _up_to_date(out: Path, src: Path, qtype: str, imatrix: Path | None) -> bool:
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        return False
    if imatrix and out.stat().st_mtime < imatrix.stat().st_mtime:
        return False
    try:
        summary = gguf_summary(out)
    except GGUFError:
        return False
    return summary["file_type"] == qtype and summary["imatrix"] == bool(imatrix)


# ----------------------------------------------------------------------------- step
def run_quantize(run: Run) -> QuantizeResult:
    """Quantize the run's text GGUF to every type in `quantize.types`; record `quantized`."""
    if run.params.model.format == "gguf":
        # Ready-made GGUF files: the download step recorded `quantized`; nothing to make here.
        quantized = {k: resolve(v) for k, v in run.artifact("quantized").items()}
        log.info("model.format gguf: using the downloaded files %s", quantized)
        return QuantizeResult(quantized, quant_table(quantized))
    text_gguf = run.artifact_path("text_gguf")
    open_gguf(text_gguf, "text GGUF (artifact text_gguf)")  # fail before the tools do, with a clearer message
    types = run.params.quantize.types
    if not types:
        raise ValueError(f"{run.params_file}: quantize.types is empty; list at least one type, e.g. [Q5_K_M]")
    imatrix = compute_imatrix(run, text_gguf) if run.params.quantize.imatrix else None
    quantized: dict[str, Path] = {}
    reused: list[str] = []
    for qtype in tqdm(types, desc="llama-quantize", unit="type"):
        path, was_reused = quantize_file(run, text_gguf, qtype, imatrix)
        quantized[qtype] = path
        if was_reused:
            reused.append(qtype)
            log.info("%s: up to date, reused %s", qtype, path.name)
        else:
            log.info("%s: wrote %s (%.1f MiB)", qtype, path.name, path.stat().st_size / 2**20)
    run.record("quantized", quantized)
    logs = {t: run.sub("logs") / f"quantize-{t}.log" for t in types}
    # The source as the table's first row, for comparison (named by its type, e.g. F16).
    source = {gguf_summary(text_gguf)["file_type"]: text_gguf}
    table = quant_table({**source, **{k: v for k, v in quantized.items() if k not in source}})
    return QuantizeResult(quantized, table, imatrix, logs, reused)
