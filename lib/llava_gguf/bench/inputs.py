"""The benchmark's inputs and surroundings: the checkpoint (made once into the cache), the disk
space it needs, the machine it runs on, and the thread counts to try."""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procmon import GiB
from .records import BenchError, MiB, _gib
from ..llama_cpp import toolchain
from ..model import quant_types
from ..model.checkpoint import Checkpoint
from ..model.tiny import SIZES, is_current, make_tiny, synthetic_tensors
from ..model.tokenizer import VOCAB_GGUF
from ..run import machine
from ..run.workspace import Run, cache_dir, resolve

log = logging.getLogger(__name__)

def benchmark_checkpoint(run: Run) -> Path:
    """model.source tiny: the synthetic checkpoint in the cache (made once); local: model.path."""
    p = run.params.model
    if p.format != "checkpoint":
        raise BenchError(f"{run.params_file}: the benchmark converts a checkpoint; set model.format: checkpoint")
    if p.source == "local":
        if not p.path or not resolve(p.path).is_dir():
            raise BenchError(f"{run.params_file}: model.path {p.path!r} is not a folder")
        return resolve(p.path)
    if p.source != "tiny":
        raise BenchError(f"{run.params_file}: model.source {p.source} is not benchmarked directly; download it "
                         "(`make download`) and point model.source: local / model.path at the folder")
    t = p.tiny
    folder = synthetic_dir(t.size, t.format, t.shards, t.seed)
    if is_current(folder, t.size):
        log.info("reusing the synthetic checkpoint %s", folder)
        return folder
    if folder.exists():  # made by an older version of make-tiny: our own product, made again
        log.info("remaking the synthetic checkpoint %s (its config.json is not the current one)", folder)
        shutil.rmtree(folder)
    log.info("making a synthetic %s checkpoint in %s (once; reused by later runs)", t.size, folder)
    return make_tiny(folder, size=t.size, fmt=t.format, shards=t.shards, seed=t.seed,
                     vocab_gguf=toolchain.source_asset(VOCAB_GGUF))


def synthetic_dir(size: str, fmt: str, shards: int, seed: int) -> Path:
    return cache_dir() / f"bench-{size}-{fmt}-{shards}shards-seed{seed}"


def synthetic_bytes(size: str) -> int:
    return sum(2 * math.prod(shape) for _, shape in synthetic_tensors(SIZES[size], "1.6"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files(folder: Path) -> dict[str, int]:
    """Regular files (not symlinks) below a folder -> bytes."""
    if not folder.exists():
        return {}
    return {str(p): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def loadavg() -> str:
    """The 1/5/15-minute load averages: other work on the machine slows every step measured."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def read_through(files: list[Path], chunk: int = 16 * MiB) -> float:
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(chunk):
                pass
    took = time.perf_counter() - t0
    log.info("read the source once (untimed): %.1f s, %.0f MiB/s", took,
             sum(f.stat().st_size for f in files) / MiB / took if took else 0)
    return took


def thread_counts(run: Run) -> list[int]:
    if run.params.bench.threads:
        return sorted(set(run.params.bench.threads))
    limit, out, n = machine.usable_cores(), [], 1
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def machine_info(run: Run) -> dict[str, Any]:
    """machine.machine_info() plus what the benchmark report states: RAM in GiB, free disk, llama.cpp."""
    info: dict[str, Any] = machine.machine_info()
    info["memory_GiB"] = round(info["ram_mib"] / 1024, 1) if info.get("ram_mib") else None
    info["disk_free_GiB"] = round(shutil.disk_usage(run.dir).free / GiB, 1)
    try:
        info["llama_cpp"] = toolchain.llama_cpp_info(run.params.llama_cpp.dir)
    except toolchain.ToolNotFound as err:
        info["llama_cpp"] = {"error": str(err)}
    return info


def _written_bpw(qtype: str) -> float:
    """Bits per weight of the file the benchmark writes for `qtype` (F16 is the export itself: none)."""
    return 0.0 if qtype.upper() == "F16" else quant_types.file_bits_per_weight(qtype, 8.5)


def disk_needed(run: Run, ckpt_bytes: int) -> int:
    """Bytes the benchmark holds on disk at its fullest moment, besides the checkpoint."""
    b = run.params.bench
    text = ckpt_bytes  # an f16 file is about the bf16 checkpoint's size
    types = set(b.quant_types) | {run.params.quantize.types[0]}
    project = text + sum(text * _written_bpw(t) / 16 for t in types)
    legacy = 2 * text + text * _written_bpw(run.params.quantize.types[0]) / 16 + 0.1 * text if b.legacy else 0
    if b.keep_outputs:
        return int(project + legacy)
    return int(max(ckpt_bytes, project, legacy))  # the plain copy, the project's files, the legacy recipe's


def check_disk(run: Run, need: int) -> None:
    """Fail before anything is written when the disk cannot hold the benchmark's fullest moment."""
    free = shutil.disk_usage(run.dir).free
    if free < 1.05 * need:
        raise BenchError(f"{run.dir}: {free / GiB:.1f} GiB free, the benchmark needs about {need / GiB:.1f} GiB "
                         f"at its peak; free space, or set bench.legacy: false / fewer bench.quant_types in "
                         f"{run.params_file}")


@dataclass
class Source:
    """The benchmark's checkpoint: its folder, shards and what the machine record says of it."""
    path: Path
    shards: list[Path]
    bytes: int
    parameters: int
    largest: dict


def prepare_source(run: Run) -> Source:
    """The checkpoint (made first when synthetic and stale, the disk checked first) and its facts;
    then the disk checked for the benchmark's fullest moment."""
    p = run.params.model
    if p.source == "tiny" and not is_current(synthetic_dir(p.tiny.size, p.tiny.format, p.tiny.shards, p.tiny.seed),
                                             p.tiny.size):
        size = synthetic_bytes(p.tiny.size)
        check_disk(run, size + disk_needed(run, size))
    ckpt = benchmark_checkpoint(run)
    with Checkpoint.open(ckpt) as c:
        shards = [ckpt / s for s in c.shards]
        n_params = sum(t.numel for t in c)
        largest = max(c, key=lambda t: t.numel)
        largest_info = {"name": largest.name, "dtype": largest.dtype, "shape": list(largest.shape),
                        "elements": largest.numel}
    ckpt_bytes = sum(s.stat().st_size for s in shards)
    check_disk(run, disk_needed(run, ckpt_bytes))
    return Source(ckpt, shards, ckpt_bytes, n_params, largest_info)


def start_record(run: Run, source: Source, main_type: str) -> dict:
    """machine.json's start: the machine, its load, the checkpoint and the main quant type."""
    info = machine_info(run)
    info["load_average_start"] = loadavg()
    info.update(checkpoint=str(source.path), checkpoint_GiB=_gib(source.bytes), parameters=source.parameters,
                largest_tensor=source.largest, quant_main=main_type, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    log.info("benchmark of %s (%.2f GiB, %d shards) on %s cores, %s GiB RAM", source.path, source.bytes / GiB,
             len(source.shards), info["usable_cores"], info.get("memory_GiB"))
    return info
