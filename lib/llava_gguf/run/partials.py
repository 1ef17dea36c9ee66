"""Hidden `.<name>.….partial` files: how writers name and lock them, and removing those left behind.

`workspace.atomic_path` writes every product under a hidden temporary name in the product's folder
and renames it when complete. A process killed mid-write (SIGKILL by the out-of-memory killer, a
kernel that dies, a power cut) never gets to delete it: at 7B that is a 13 GB file that `ls` does
not show. `remove_stale(folder)` deletes such leftovers; the pipeline calls it when a run starts.

It must never delete a file that a live writer is still filling (a second run of the same params,
a notebook open in JupyterLab, the benchmark). Two independent signs are required before a partial
is deleted, and each errs on the side of keeping the file:

1. its writer is gone: the name carries the writer's pid and that process's start time
   (`.<name>.<pid>-<start>.<random><suffix>.partial`); the writer is alive when a process with that
   pid and that start time exists (a reused pid has another start time; a zombie counts as gone);
2. nobody holds its lock: the writer holds an exclusive `flock` on the file for as long as it
   writes, and the kernel releases it when the process dies however it dies. The lock is what
   protects writers in another pid namespace (a container) or on another host sharing the folder.

Partials named before pids were recorded (`.<name>.<random>.partial`, left by an older version of
the project) have only the second sign: they are stale when unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".partial"
# Greedy: the last `.<pid>-<start>.<8 random chars>` of the name (the product's own name comes first).
_OWNER = re.compile(r"^\..+\.(\d+)-(\d+)\.[a-z0-9_]{8}[^/]*\.partial$")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None when unknown; "" for a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def owner_tag(pid: int | None = None) -> str:
    """`<pid>-<start time>` of this (or the given) process, as partial names carry it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid) or 0}"


def prefix(final: Path) -> str:
    """The `mkstemp` prefix of a partial for `final`: hidden, named after it and after its writer."""
    return f".{final.name}.{owner_tag()}."


def hold(fd: int) -> None:
    """Lock an open partial for the writer's lifetime (released by the kernel when it exits)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:  # a filesystem without locks (some FUSE/NFS mounts): the pid alone tells
        log.debug("no lock on a partial file (%s); its name still carries this process's id", err)


def _writer_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _start_time(pid)
    if now is None:  # no /proc (macOS): the pid alone decides
        return True
    return now != "" and (start == "0" or now == start)


def _locked(path: Path) -> bool:
    """Whether some process holds the partial's lock (checked without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # already gone: nothing to do
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        return False  # no locks on this filesystem: the writer's pid has decided
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def is_stale(path: Path) -> bool:
    """Whether a partial's writer is gone (see the module docstring for the two signs)."""
    path = Path(path)
    m = _OWNER.search(path.name)
    if m and _writer_alive(int(m.group(1)), m.group(2)):
        return False
    return not _locked(path)


def find(folder: Path | str) -> list[Path]:
    """Every hidden partial file under `folder` (symlinked folders inside it are not entered)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob(f".*{SUFFIX}") if p.is_file() and not p.is_symlink())


def remove_stale(folder: Path | str) -> list[Path]:
    """Delete the partials under `folder` whose writer is gone; returns what was deleted."""
    removed = []
    for path in find(folder):
        if not is_stale(path):
            log.debug("%s: kept, its writer is still running", path)
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
        log.info("removed %s (%.1f MiB), left by an interrupted run", path, size / 2**20)
    return removed
