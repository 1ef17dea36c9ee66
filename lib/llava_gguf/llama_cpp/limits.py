"""How long each tool may run before it is stopped: one table, a base plus terms scaled to the work.

    limit = (base_s + per_gib_s * GiB + per_gib_token_s * GiB * tokens) * scale

GiB is the size of the model the tool reads (the text GGUF, the mmproj for the vision tools, the
checkpoint for llama.cpp's legacy scripts), tokens the tokens it processes. A limit bounds a hang,
not a speed: the terms are about ten times what this project's 2-core x86-64 machine took (README,
"Measured here": llama-quantize of the 7B f16, 12.55 GiB, in 260 s; pp512 of Q4_K_M, 3.80 GiB, at
9.8 tokens/s on one thread, i.e. 0.027 s per GiB and token; the first llama.cpp build in 19 min 35 s
at load 6-7, the cross build in 36 min at load 8).

`scale` is $LLAVA_GGUF_TIMEOUT_SCALE (default 1, run/timeout_scale.py): a board more than ten times
slower than that machine raises it, and `make arm64-rehearsal` sets it for its qemu-user run.

The llama.cpp runs whose length the user chooses have their limit in the params:
`evaluate.timeout_s` (llama-mtmd-cli, llama-perplexity), `bench.timeout_s` (each measured step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..run.timeout_scale import SCALE_ENV, scale

__all__ = ["GiB", "LIMITS", "Limit", "LimitError", "SCALE_ENV", "gib", "scale", "seconds"]

GiB = 2**30


@dataclass(frozen=True)
class Limit:
    base_s: float  # start-up, model load, a slow disk
    per_gib_s: float = 0.0  # per GiB of model read or written once
    per_gib_token_s: float = 0.0  # per token through one GiB of weights


LIMITS: dict[str, Limit] = {
    # making the toolchain and the legacy environment
    "pip download": Limit(1800),  # the ~77 MB sdist over a slow link
    "pip install": Limit(1800),  # the legacy venv's three pinned packages
    "python -m venv": Limit(300),
    "python": Limit(300),  # a short check run by a venv's python
    "patch": Limit(120),
    "cmake configure": Limit(900),
    "cmake build": Limit(4 * 3600),
    "--version": Limit(60),
    # llama-server's chat page (webui.py): 45 s and 3.5 min here
    "npm ci": Limit(1800),
    "npm run build": Limit(1800),
    # llama.cpp's tools
    "llama-quantize": Limit(300, per_gib_s=300),
    "llama-imatrix": Limit(300, per_gib_s=60, per_gib_token_s=0.25),
    "llama-debug": Limit(300, per_gib_s=60, per_gib_token_s=0.25),
    "llama-tokenize": Limit(120, per_gib_s=30),
    "llama-mtmd-debug": Limit(300, per_gib_s=60, per_gib_token_s=0.25),
    "llama-mtmd-cli": Limit(600, per_gib_s=60, per_gib_token_s=0.25),
    "llama-bench": Limit(300, per_gib_s=60, per_gib_token_s=0.25),
    # llama.cpp's legacy LLaVA scripts (legacy.py); GiB: the checkpoint files they read
    "legacy script": Limit(600, per_gib_s=120),
}


class LimitError(LookupError):
    """A tool has no limit in LIMITS (add its row there)."""


def seconds(tool: str, gib: float = 0.0, tokens: int = 0) -> float:
    """The limit of one run of `tool` (a key of LIMITS) that reads `gib` GiB and processes `tokens` tokens."""
    try:
        lim = LIMITS[tool]
    except KeyError:
        raise LimitError(f"no time limit declared for '{tool}' in llama_cpp/limits.py LIMITS; "
                         f"declared: {', '.join(LIMITS)}") from None
    return (lim.base_s + lim.per_gib_s * gib + lim.per_gib_token_s * gib * tokens) * scale()


def gib(paths: Iterable[str | Path]) -> float:
    """GiB of the files named (a folder counts its top-level files; links count their targets once).

    A named path that is missing raises FileNotFoundError: counted as 0 GiB it would silently give the
    tool reading it the shortest limit. A caller whose arguments name outputs too filters them first."""
    seen: dict[Path, int] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file, so no time limit can be scaled to its size; check the "
                                    "path, or that the step that makes it has run")
        for f in (sorted(p.iterdir()) if p.is_dir() else [p]):
            if f.is_file():
                seen.setdefault(f.resolve(), f.stat().st_size)
    return sum(seen.values()) / GiB
