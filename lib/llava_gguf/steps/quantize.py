"""Step 05: quantize the text GGUF with `llama-quantize`, one file per type in `quantize.types`.

Only the text model is quantized; the mmproj stays as exported (llama.cpp runs the CLIP encoder
from F16/F32 and small vision towers lose accuracy fast under quantization).

With `quantize.imatrix: true` an importance matrix is computed first by `llama-imatrix` over
the calibration corpus (`corpus.corpus_path("calibration")`, disjoint from the text KLD is
measured on) and passed to every quantization.

Outputs go to `outputs/<run>/models/<stem>-<TYPE>.gguf`, where <stem> is the text GGUF's name
without its float suffix (`-f16`). llama-quantize writes straight to the path it is given, so it
is given a temporary name that is renamed when the tool succeeded. A file already there is reused
when it is newer than the text GGUF, its metadata says the same type and imatrix use, the same
llama.cpp build made it and its content is what was written (`stamps`: size, times, sha256);
`FORCE=1` (`workspace.forced()`) makes every file again.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..checks.acceptance import Checks
from ..llama_cpp import corpus, limits, toolchain
from ..model import quant_types
from ..model.gguf_io import GGUFError, gguf_summary, open_gguf, quant_table
from ..model.quant_types import TEXT_OUTTYPES
from ..reports import tables
from ..run import diskspace, stamps, workspace
from ..run.topology import usable_cores
from ..run.workspace import Run, atomic_path
from . import tools as step_tools

log = logging.getLogger(__name__)

# Suffixes that name the float type of an unquantized export; dropped before adding the quant type.
_FLOAT_SUFFIX = re.compile(rf"[-_.]({'|'.join(TEXT_OUTTYPES)})$", re.I)


@dataclass
class QuantizeResult:
    quantized: dict[str, Path]
    files: pd.DataFrame  # gguf_io.quant_table of the source and every quantized file
    imatrix: Path | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    checks: Checks = field(default_factory=lambda: Checks("quantize"))

    def table(self) -> pd.DataFrame:
        return tables.rounded(self.files)  # for display; `files` keeps full precision

    def __str__(self) -> str:
        return (f"QuantizeResult({', '.join(f'{k}: {Path(v).name}' for k, v in self.quantized.items())}; "
                f"imatrix {self.imatrix}; reused {self.reused})")


def output_stem(text_gguf: Path) -> str:
    return _FLOAT_SUFFIX.sub("", text_gguf.stem)


def threads(run: Run) -> int:
    return run.params.quantize.threads or usable_cores()


def estimated_size(text_gguf: Path, qtype: str) -> int:
    """About how many bytes llama-quantize will write for `qtype` (metadata as in the source, the
    matrices at quant_types.file_bits_per_weight, 1-D tensors kept F32): to check the free disk."""
    header = open_gguf(text_gguf, "text GGUF (artifact text_gguf)")
    tensors = list(header.tensors.values())
    meta = min((t.offset for t in tensors), default=0)
    matrices = sum(t.n_elements for t in tensors if len(t.shape) > 1)
    vectors = sum(t.n_elements for t in tensors if len(t.shape) <= 1)
    return int(meta + matrices * quant_types.file_bits_per_weight(qtype) / 8 + 4 * vectors)


# ----------------------------------------------------------------------------- tools
def compute_imatrix(run: Run, text_gguf: Path, force: bool = False) -> Path:
    """The importance matrix of the text model over the calibration corpus (reused when newer)."""
    q = run.params.quantize
    ctx = q.imatrix_ctx
    calib = corpus.corpus_path("calibration")
    out = run.sub("models") / f"{output_stem(text_gguf)}-imatrix-c{ctx}x{q.imatrix_chunks}.gguf"
    tool = toolchain.find_tool("llama-imatrix", run.params.llama_cpp.dir)
    if not force and out.exists() and out.stat().st_mtime >= max(text_gguf.stat().st_mtime, calib.stat().st_mtime) \
            and _reusable(out, tool):
        log.info("reusing importance matrix %s", out)
        return out
    with atomic_path(out, suffix=".gguf") as tmp, diskspace.disk_errors(out, None, "the importance matrix", tmp):
        log.info("computing importance matrix over %d chunks of %d tokens of %s", q.imatrix_chunks, ctx, calib.name)
        limit = limits.seconds("llama-imatrix", limits.gib([text_gguf]), ctx * q.imatrix_chunks)
        toolchain.run_tool([tool, "-m", text_gguf, "-f", calib, "-o", tmp, "-c", ctx, "--chunks",
                            q.imatrix_chunks, "-t", threads(run)], run.sub("logs") / "imatrix.log", limit,
                           what="llama-imatrix")
        open_gguf(tmp, "importance matrix")
    _stamp(out, tool)
    return out


def quantize_file(run: Run, text_gguf: Path, qtype: str, imatrix: Path | None = None,
                  force: bool = False, out: Path | None = None) -> tuple[Path, bool]:
    """Quantize `text_gguf` to `qtype` (again with `force`); returns (path, reused). `out` names another
    file than the step's `<stem>-<TYPE>.gguf` (07_tune's second variant of a type, with or without
    the importance matrix)."""
    log_name = f"quantize-{qtype}.log" if out is None else f"quantize-{Path(out).stem}.log"
    out = out or run.sub("models") / f"{output_stem(text_gguf)}-{qtype}.gguf"
    tool = toolchain.find_tool("llama-quantize", run.params.llama_cpp.dir)
    if not force and _up_to_date(out, text_gguf, qtype, imatrix) and _reusable(out, tool):
        return out, True
    extra = ["--imatrix", imatrix] if imatrix else []
    needed = estimated_size(text_gguf, qtype)
    diskspace.ensure_space(out, needed, f"the {qtype} file")
    with atomic_path(out, suffix=".gguf") as tmp, diskspace.disk_errors(out, needed, f"the {qtype} file", tmp):
        toolchain.run_tool([tool, *extra, text_gguf, tmp, qtype, threads(run)],
                           run.sub("logs") / log_name,
                           limits.seconds("llama-quantize", limits.gib([text_gguf])), what=f"llama-quantize {qtype}")
        got = gguf_summary(tmp)["file_type"]
        if got != qtype:
            raise GGUFError(f"{tmp}: llama-quantize wrote file type {got}, asked for {qtype}; "
                            f"see {run.sub('logs') / log_name}")
    _stamp(out, tool)
    return out, False


def _tool_stamp(tool: Path) -> str:
    """Which build made a file: another LLAMA_CPP_DIR or a rebuilt tool means make it again."""
    st = tool.resolve().stat()
    return f"{tool.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _stamp(out: Path, tool: Path) -> None:
    stamps.record(out, tool=_tool_stamp(tool))


def _reusable(out: Path, tool: Path) -> bool:
    """Made by this build and unchanged since (see `stamps.unchanged`)."""
    ok, why = stamps.unchanged(out, tool=_tool_stamp(tool))
    if not ok and stamps.read(out) == {"tool": _tool_stamp(tool)}:
        # Made by this build before content hashes were recorded: hash it now rather than redo it.
        _stamp(out, tool)
        ok, why = True, "same build, hash recorded now"
    if not ok:
        log.info("%s: made again: %s", out.name, why)
    return ok


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
def run_quantize(run: Run, force: bool | None = None) -> QuantizeResult:
    """Quantize the run's text GGUF to every type in `quantize.types`; record `quantized`; then
    the acceptance checks (CheckFailed names the one that failed).
    `force` (default: `workspace.forced()`, i.e. FORCE=1) makes every file again."""
    result = make_quantized(run, workspace.forced() if force is None else force)
    result.checks = acceptance_checks(result).enforce()
    return result


def acceptance_checks(result: QuantizeResult) -> Checks:
    """Every file has the type asked for, real weights and the source's parameter count."""
    checks = Checks("quantize")
    checks.add("files made", ", ".join(result.quantized) or "none", "at least one quantize.types entry",
               bool(result.quantized))
    files = result.files.set_index("variant") if len(result.files) else pd.DataFrame()
    for qtype in result.quantized:
        got = files["file_type"].get(qtype) if "file_type" in files else None
        checks.add(f"{qtype} file type", got, f"{qtype}, as asked", got == qtype)
    if len(files):
        bpw = files["bpw"]
        checks.add("bits per weight", f"{bpw.min():.2f} to {bpw.max():.2f}", "above 0 in every file",
                   bool((bpw > 0).all()))
        counts = sorted({int(n) for n in files["params"]})
        checks.add("parameters", ", ".join(f"{n:,}" for n in counts),
                   f"one count in every file, the source's ({int(files['params'].iloc[0]):,})", len(counts) == 1)
    return checks


def make_quantized(run: Run, force: bool) -> QuantizeResult:
    """The step's work, unchecked: the quantized files (made or reused) and their table."""
    if run.params.model.format == "gguf":
        # Ready-made GGUF files: the download step recorded `quantized`; nothing to make here.
        quantized = {k: run.resolve(v) for k, v in run.artifact("quantized").items()}
        log.info("model.format gguf: using the downloaded files %s", quantized)
        return QuantizeResult(quantized, quant_table(quantized))
    text_gguf = run.artifact_path("text_gguf")
    # Read before the tools run, for a clearer message than theirs on a broken file.
    source_type = open_gguf(text_gguf, "text GGUF (artifact text_gguf)").file_type
    step_tools.require(run.params, "quantize")  # before the importance matrix takes its minutes
    types = run.params.quantize.types
    if not types:
        raise ValueError(f"{run.params_file}: quantize.types is empty; list at least one type, e.g. [Q5_K_M]")
    if source_type not in ("F32", "F16", "BF16"):
        raise ValueError(f"{run.params_file}: convert.outtype made a {source_type} text GGUF, which llama-quantize "
                         f"will not requantize to {types}; set convert.outtype: f16 (or bf16/f32) for quantize.types")
    imatrix = compute_imatrix(run, text_gguf, force) if run.params.quantize.imatrix else None
    quantized: dict[str, Path] = {}
    reused: list[str] = []
    for qtype in tqdm(types, desc="llama-quantize", unit="type"):
        path, was_reused = quantize_file(run, text_gguf, qtype, imatrix, force)
        quantized[qtype] = path
        if was_reused:
            reused.append(qtype)
            log.info("%s: up to date, reused %s", qtype, path.name)
        else:
            log.info("%s: wrote %s (%.1f MiB)", qtype, path.name, path.stat().st_size / 2**20)
    run.record("quantized", quantized)
    logs = {t: run.sub("logs") / f"quantize-{t}.log" for t in types}
    # The source as the table's first row, for comparison (named by its type, e.g. F16).
    source = {source_type: text_gguf}
    table = quant_table({**source, **{k: v for k, v in quantized.items() if k not in source}})
    return QuantizeResult(quantized, table, imatrix, logs, reused)


def llama_cpp_tools(params) -> tuple[list[str], list[str]]:
    """(required, optional)."""
    if params.model.format == "gguf":
        return [], []
    return ["llama-quantize"] + (["llama-imatrix"] if params.quantize.imatrix else []), []
