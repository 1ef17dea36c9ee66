"""Disk space: check it before each large write, and say so plainly when a write ran out of it.

A full disk otherwise surfaces as whatever the writer happens to say: numpy's
"OSError: 8388608 requested and 7776704 written" (no errno), llama-quantize's
"basic_ios::clear: iostream error", a hub client's download error. Here it becomes one
`DiskFullError`: "no space left on <mount point> (<device>) for <file>: needed ~N GiB, free M GiB",
with what to do.

- `ensure_space(path, needed, what)` before a write whose size is known from its plan (text and
  vision export, quantization estimated from the type, downloads from the hub's file sizes).
  The product is written under a temporary name and renamed, so the file it replaces frees its
  space only afterwards: the whole size must be free.
- `disk_errors(path, needed, what)` around a write: a failure that is a full disk (ENOSPC /
  EDQUOT, or a writer's own words for it while the disk is in fact full) is re-raised as
  `DiskFullError`. Put it *inside* the `atomic_path` block, so the space is measured before the
  partial file is deleted.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Kept free beyond a write's own size: logs, reports, JSON written after it, the filesystem's own needs.
RESERVE = 64 * 2**20
# How writers say "the disk is full" when they do not pass the errno on.
_FULL_WORDS = re.compile(r"No space left on device|Disk quota exceeded|iostream error|\d+ requested and \d+ written"
                         r"|failed to write|short write|write error", re.I)


class DiskFullError(OSError):
    """Not enough free disk for a write; names the path, its filesystem, the space needed and free."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def size_text(n: float) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (the folder a new file will be made in may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path | str) -> Path:
    """The mount point of the filesystem that holds (or will hold) `path`."""
    path = _existing(Path(path)).resolve()
    dev = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def device(path: Path | str) -> str | None:
    """The device or filesystem name mounted there (/dev/sda2, tmpfs, server:/export), if known."""
    mount = str(mount_point(path))
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) > 2 and parts[1].replace("\\040", " ") == mount:
            found = parts[0]  # the last mount on a point is the visible one
    return found


def where(path: Path | str) -> str:
    """'<mount point> (<device>)', how the messages name a filesystem."""
    mount, dev = mount_point(path), device(path)
    return f"{mount} ({dev})" if dev and dev != str(mount) else str(mount)


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged writer can still use on the filesystem of `path`."""
    return shutil.disk_usage(_existing(Path(path))).free


def _message(path: Path, needed: int | None, free: int, what: str) -> str:
    need = f"needed ~{size_text(needed)}, " if needed else ""
    hint = "free some space there, or put the run's outputs on a bigger disk (a symlinked outputs/ works)"
    if path.is_file() and not path.name.startswith("."):
        hint += (f"; the existing {path.name} ({size_text(path.stat().st_size)}) is replaced only once the new "
                 "file is complete, so delete it first to use its space")
    return f"no space left on {where(path)} for {what or path.name} ({path}): {need}free {size_text(free)}; {hint}"


def ensure_space(path: Path | str, needed: int, what: str = "") -> None:
    """Raise DiskFullError unless `needed` bytes (plus a reserve) are free where `path` will be written."""
    path = Path(path)
    free = free_bytes(path)
    if free < needed + RESERVE:
        raise DiskFullError(_message(path, needed, free, what))
    log.debug("%s: %s free for %s", where(path), size_text(free), size_text(needed))


def is_full_disk(err: BaseException, path: Path | str, text: str = "") -> bool:
    """Whether a failed write ran out of disk: the errno says so, or the writer's words (in its
    message or `text`, e.g. a tool's log) say it and the disk holding `path` is in fact (nearly) full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not _FULL_WORDS.search(f"{err}\n{text}"):
        return False
    return free_bytes(path) < RESERVE


@contextlib.contextmanager
def disk_errors(final: Path | str, needed: int | None = None, what: str = "",
                partial: Path | str | None = None) -> Iterator[None]:
    """Re-raise a failure of the write of `final` that is a full disk as DiskFullError (see the
    module docstring). `partial`: the temporary file being written, whose size so far counts as
    space the write had. A failed tool is recognised by its log (an exception with a `log_file`)."""
    final = Path(final)
    try:
        yield
    except DiskFullError:
        raise
    # How a write that ran out of disk surfaces: an OSError (with ENOSPC, or numpy's "N requested and
    # M written"), a RuntimeError (a tool's ToolFailed with its log, torch's "PytorchStreamWriter
    # failed writing file", a hub client's wrapped error), a ValueError (a reader of the cut-off file).
    except (OSError, RuntimeError, ValueError) as err:
        text = ""
        log_file = getattr(err, "log_file", None)
        if log_file is not None:
            with contextlib.suppress(OSError):
                text = Path(log_file).read_text(errors="replace")[-20000:]
        if not is_full_disk(err, final, text):
            raise
        written = Path(partial).stat().st_size if partial and Path(partial).is_file() else 0
        raise DiskFullError(_message(final, needed, free_bytes(final) + written, what)
                            + f" (the write stopped with {_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
