"""Which weights llama.cpp repacked at load, read from its load log.

ggml's CPU backend rewrites some quantized weights into interleaved layouts for the CPU it runs on
(`ggml_repack_get_optimal_repack_type` in ggml-cpu/repack.cpp): on x86 with AVX2 Q4_0, Q4_K and
IQ4_NL; on Armv8.6+ with i8mm (the O6) also Q5_K, Q6_K and Q8_0, and Q4_0 as 8x8 only when SVE is
256 bits wide (4x8 at the O6's 128). Which kernels ran is therefore a property of the run, not of the file, and is read
from two lines of the log:
- `load_tensors:   CPU_REPACK model buffer size = 1.23 MiB` (INFO: some weights were repacked);
- `repack: repack tensor blk.0.attn_q.weight with q4_K_8x8` (DEBUG, only with `-lv 5` / `-v`).

`probe` loads a GGUF once with debug logging (llama-bench, one short run) and keeps the log.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from .toolchain import run_tool

log = logging.getLogger(__name__)

_TENSOR = re.compile(r"repack tensor (\S+) with (\w+?)_(\d+x\d+)\b")
_BUFFER = re.compile(r"CPU_REPACK model buffer size =\s*([\d.]+) MiB")


def parse_repacks(text: str) -> dict[str, str]:
    """tensor name -> layout (e.g. 'q4_K_8x8') from a debug-level load log."""
    return {m.group(1): f"{m.group(2)}_{m.group(3)}" for m in _TENSOR.finditer(text)}


def repack_buffer_mib(text: str) -> float | None:
    """Size of the CPU_REPACK buffer (None: the log has no such line, nothing was repacked)."""
    sizes = [float(m.group(1)) for m in _BUFFER.finditer(text)]
    return sum(sizes) if sizes else None


def summarize(text: str) -> dict:
    """{'buffer_mib', 'tensors', 'layouts': {layout: count}, 'types': [ggml type names repacked]}."""
    tensors = parse_repacks(text)
    layouts = Counter(tensors.values())
    return {"buffer_mib": repack_buffer_mib(text), "tensors": len(tensors), "layouts": dict(sorted(layouts.items())),
            "types": sorted({layout.rsplit("_", 1)[0] for layout in layouts})}


def probe(gguf: Path, llama_bench: Path, log_file: Path, threads: int = 1, timeout: float = 1800) -> dict:
    """Load `gguf` once with llama-bench at debug verbosity; the repack summary of its log."""
    text = run_tool([llama_bench, "-m", gguf, "-p", "8", "-n", "1", "-r", "1", "-t", threads, "-v"],
                    log_file, timeout=timeout, what=f"llama-bench (repack probe) on {Path(gguf).name}")
    out = summarize(text)
    log.info("%s: %s repacked (%s)", Path(gguf).name, ", ".join(out["types"]) or "nothing",
             ", ".join(f"{k} x{v}" for k, v in out["layouts"].items()) or "no CPU_REPACK buffer")
    return out
