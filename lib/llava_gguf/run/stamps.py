"""What a product file was when it was written, kept beside it, to tell whether it changed since.

`record(path, tool=...)` writes `<file>.made-by` (JSON): the file's size, modification time,
inode, status-change time and sha256, plus what made it (e.g. the llama.cpp tool's stamp).
`unchanged(path, tool=...)` is true only when the same maker made it and the content is the
recorded one. It reads the file only when it must: the status-change time (ctime) moves with every
write, chmod or utime and cannot be set back, so equal size, mtime, ctime and inode mean untouched;
otherwise (a same-size corruption, a file copied to another disk) the sha256 decides, and an
intact file's new times are recorded so the next check is quick again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path


from .workspace import sha256_file, write_json

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".made-by"
_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino")


def sidecar(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def read(path: Path | str) -> dict | None:
    """The record of a file, None when there is none. A sidecar of an older format (plain text:
    the maker only) reads as {"tool": <text>}."""
    f = sidecar(path)
    try:
        text = f.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {"tool": text}
    return data if isinstance(data, dict) else None


def record(path: Path | str, **about: str) -> dict:
    """Record a just-written file's size, times and sha256 with `about` (what made it)."""
    path = Path(path)
    before = _stat(path)
    digest = sha256_file(path)
    if _stat(path) != before:
        raise RuntimeError(f"{path}: changed while its sha256 was computed; something else writes to it")
    data = {**about, **before, "sha256": digest}
    write_json(sidecar(path), data)
    return data


def unchanged(path: Path | str, **about: str) -> tuple[bool, str]:
    """(True, why) when `path` is what `record` saw and was made by `about`; else (False, why)."""
    path = Path(path)
    if not path.is_file():
        return False, "missing"
    data = read(path)
    if data is None:
        return False, "no record of how it was made"
    for key, value in about.items():
        if data.get(key) != value:
            return False, f"made with another {key} ({data.get(key)!r}, now {value!r})"
    if "sha256" not in data:
        return False, "made before content hashes were recorded"
    now = _stat(path)
    if all(data.get(k) == now[k] for k in _STAT_KEYS):
        return True, "unchanged since it was written"
    if now["size"] != data.get("size"):
        return False, f"its size changed ({data.get('size')} -> {now['size']} bytes)"
    if sha256_file(path) != data["sha256"]:
        return False, "its content changed since it was written (sha256 differs)"
    # Same bytes, new times (copied, moved to another disk, touched): remember the new times.
    write_json(sidecar(path), {**data, **now})
    return True, "same content (sha256), new file times recorded"


def forget(path: Path | str) -> None:
    sidecar(path).unlink(missing_ok=True)
