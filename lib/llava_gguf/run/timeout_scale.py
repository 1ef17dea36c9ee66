"""One multiplier for every time limit: $LLAVA_GGUF_TIMEOUT_SCALE (default 1).

A board much slower than this project's 2-core x86-64 machine raises it, and `make arm64-rehearsal`
sets it for its qemu-user run (rehearsal.QEMU_SLOWDOWN). It lives in run/ because both layers wait
on something: llama_cpp/limits.py multiplies each tool's limit by it, and run/workspace.cache_lock
the time a second process waits for a shared-cache entry (a build under qemu is ~20x slower, and a
lock that gave up after the x86 time would fail a rehearsal that is merely slow).
"""
from __future__ import annotations

import os

SCALE_ENV = "LLAVA_GGUF_TIMEOUT_SCALE"


def scale() -> float:
    """The multiplier of every limit: $LLAVA_GGUF_TIMEOUT_SCALE, default 1."""
    text = os.environ.get(SCALE_ENV, "").strip()
    try:
        factor = float(text) if text else 1.0
    except ValueError:
        raise ValueError(f"${SCALE_ENV}={text!r}: not a number; set it to a factor such as 3 "
                         "(every time limit is multiplied by it) or unset it") from None
    if factor <= 0:
        raise ValueError(f"${SCALE_ENV}={text!r}: must be above 0")
    return factor
