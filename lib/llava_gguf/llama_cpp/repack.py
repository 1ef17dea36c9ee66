"""Which weights llama.cpp repacks on this CPU, probed per GGUF (the rehearsal's repack.json).

`probe` loads a GGUF once with debug logging (llama-bench, one short run), keeps the log and
summarizes it with repack_log, the one reader of llama.cpp's load logs.
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import limits
from .repack_log import parse_repack_log
from .runner import run_tool

log = logging.getLogger(__name__)


def summarize(text: str) -> dict:
    """{'buffer_mib', 'tensors', 'layouts': {layout: count}, 'types': [ggml type names repacked]} of the
    load that ran (buffer_mib None: no repack buffer was made)."""
    final = parse_repack_log(text).final
    if final is None:
        return {"buffer_mib": None, "tensors": 0, "layouts": {}, "types": []}
    return {"buffer_mib": final.repack_mib or None, "tensors": len(final.repacked),
            "layouts": dict(sorted(final.layouts().items())), "types": final.repacked_types()}


def probe(gguf: Path, llama_bench: Path, log_file: Path, threads: int = 1, timeout: float | None = None) -> dict:
    """Load `gguf` once with llama-bench at debug verbosity; the repack summary of its log."""
    timeout = timeout or limits.seconds("llama-bench", limits.gib([gguf]), 9)
    text = run_tool([llama_bench, "-m", gguf, "-p", "8", "-n", "1", "-r", "1", "-t", threads, "-v"],
                    log_file, timeout=timeout, what=f"llama-bench (repack probe) on {Path(gguf).name}")
    out = summarize(text)
    log.info("%s: %s repacked (%s)", Path(gguf).name, ", ".join(out["types"]) or "nothing",
             ", ".join(f"{k} x{v}" for k, v in out["layouts"].items()) or "no CPU_REPACK buffer")
    return out
