"""Measure a process tree: wall time, peak anonymous and file-backed memory, bytes written, CPU time.

A step runs in a child process (a command, or a library function called in a fresh Python
interpreter) so that what is measured is the step's own cost, not the caller's. Every ~50 ms the
whole tree under the child (psutil) is sampled: `RssAnon` (heap, numpy/torch buffers: memory the
kernel cannot drop) and `RssFile` (pages of memory-mapped or read files: reclaimable under
pressure, so reported apart) are summed over the tree, and the peaks of the sums are kept. Those
two are read from /proc/<pid>/status, the one figure psutil does not split.

Bytes written are the kernel's `write_bytes` accounting (psutil's io_counters): bytes the tree
caused to be written to storage, counted when pages are dirtied, so writes still in the page cache
count too. A process's counters include its exited, reaped children; the child is read once more
after it exits and before it is reaped (`waitid(WNOWAIT)`, which psutil does not offer), so nothing
the tree wrote is missed. CPU time comes from the same zombie (own plus reaped children's user and
system time).

Sampling misses peaks shorter than the interval; for the multi-second steps measured here that is
a few percent at most. Linux only.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from ..llama_cpp.runner import kill_tree
from ..run.workspace import setup_logging

log = logging.getLogger(__name__)

GiB = 2**30


class MeasuredFailure(RuntimeError):
    """A measured command or call failed; the message names its log or carries the child's traceback."""

    def __init__(self, message: str, measurement: "Measurement"):
        super().__init__(message)
        self.measurement = measurement


@dataclass
class Measurement:
    label: str
    wall_s: float
    peak_anon: int  # bytes: peak over time of the tree's summed RssAnon
    peak_file: int  # bytes: peak of the summed RssFile (reclaimable page-cache pages)
    peak_rss: int  # bytes: peak of the summed RssAnon + RssFile + RssShmem
    write_bytes: int  # bytes the tree caused to be written to storage (/proc/<pid>/io)
    read_bytes: int  # bytes the tree caused to be read from storage (0 when served from page cache)
    cpu_s: float  # user + system time of the tree
    returncode: int
    samples: int
    max_processes: int  # the most processes seen at once in the tree
    # (seconds since start, RssAnon bytes, RssFile bytes), thinned to at most ~400 points.
    timeline: list[tuple[float, int, int]] = field(default_factory=list, repr=False)
    result: Any = field(default=None, repr=False)  # what a measured call returned
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None

    def row(self) -> dict[str, Any]:
        """The flat numbers, for a table row (timeline and result left out)."""
        d = asdict(self)
        for k in ("timeline", "result"):
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- reading the tree
def tree(root: int) -> list[psutil.Process]:
    """The root and all its live descendants (empty once the root is gone)."""
    try:
        proc = psutil.Process(root)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def read_status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, RssShmem of a process in bytes (empty once it is gone or a zombie).

    psutil's `rss - shared` is RssAnon, but its `shared` lumps the file-backed pages (reclaimable)
    with shared memory (not): /proc/<pid>/status keeps them apart."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def read_io(proc: psutil.Process) -> tuple[int, int]:
    """(write_bytes, read_bytes) of a process plus its reaped children; (0, 0) once it is gone."""
    try:
        io = proc.io_counters()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0
    return io.write_bytes, io.read_bytes


def read_cpu_s(proc: psutil.Process) -> float:
    """User + system time of a process and its reaped children, in seconds."""
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------- the sampler
class _Sampler:
    def __init__(self, root: int, interval: float):
        self.root, self.interval = root, interval
        self.t0 = time.perf_counter()
        self.peak_anon = self.peak_file = self.peak_rss = 0
        self.write_bytes = self.read_bytes = 0
        self.samples = self.max_processes = 0
        self.timeline: list[tuple[float, int, int]] = []

    def sample(self) -> None:
        anon = file = shmem = written = read = 0
        procs = tree(self.root)
        for proc in procs:
            st = read_status(proc.pid)
            anon += st.get("RssAnon", 0)
            file += st.get("RssFile", 0)
            shmem += st.get("RssShmem", 0)
            # Each live process's counters hold its own and its reaped children's I/O, never a live
            # child's, so the sum over the live tree is the tree's total so far.
            w, r = read_io(proc)
            written += w
            read += r
        self.samples += 1
        self.max_processes = max(self.max_processes, len(procs))
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_file = max(self.peak_file, file)
        self.peak_rss = max(self.peak_rss, anon + file + shmem)
        self.write_bytes = max(self.write_bytes, written)
        self.read_bytes = max(self.read_bytes, read)
        self.timeline.append((time.perf_counter() - self.t0, anon, file))

    def thinned_timeline(self, points: int = 400) -> list[tuple[float, int, int]]:
        tl = self.timeline
        if len(tl) <= points:
            return list(tl)
        step = len(tl) / points
        # Keep each window's highest-anon sample so the peak survives thinning.
        return [max(tl[int(i * step):int((i + 1) * step)] or [tl[-1]], key=lambda s: s[1]) for i in range(points)]


def _watch(pid: int, label: str, interval: float, timeout: float | None,
           progress: Callable[[_Sampler], None] | None) -> tuple[_Sampler, float, bool]:
    """Sample the tree under `pid` until it exits (left unreaped); returns (sampler, cpu_s, timed_out)."""
    s = _Sampler(pid, interval)
    timed_out = False
    while True:
        s.sample()
        if progress:
            progress(s)
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
            break
        if info is not None:
            break
        if timeout and time.perf_counter() - s.t0 > timeout and not timed_out:
            timed_out = True
            log.error("%s ran past %s s; killing it", label, timeout)
            kill_tree(pid)
        time.sleep(interval)
    # The zombie's counters include every reaped descendant: the final, complete totals.
    try:
        zombie = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return s, 0.0, timed_out
    w, r = read_io(zombie)
    s.write_bytes, s.read_bytes = max(s.write_bytes, w), max(s.read_bytes, r)
    return s, read_cpu_s(zombie), timed_out


class _Heartbeat:
    """A log line every `every` seconds for steps that print nothing for minutes."""

    def __init__(self, label: str, every: float):
        self.label, self.every, self.next = label, every, every

    def __call__(self, s: _Sampler) -> None:
        elapsed = time.perf_counter() - s.t0
        if self.every and elapsed >= self.next:
            self.next += self.every
            cur = s.timeline[-1]
            log.info("%s: %.0f s, anon %.2f GiB (peak %.2f), file-backed %.2f GiB, written %.2f GiB", self.label,
                     elapsed, cur[1] / GiB, s.peak_anon / GiB, cur[2] / GiB, s.write_bytes / GiB)


def _measurement(label: str, s: _Sampler, cpu: float, rc: int, wall: float, **extra) -> Measurement:
    return Measurement(label=label, wall_s=wall, peak_anon=s.peak_anon, peak_file=s.peak_file,
                       peak_rss=s.peak_rss, write_bytes=s.write_bytes, read_bytes=s.read_bytes, cpu_s=cpu,
                       returncode=rc, samples=s.samples, max_processes=s.max_processes,
                       timeline=s.thinned_timeline(), **extra)


# ----------------------------------------------------------------------------- public API
def measure_command(cmd: list, label: str | None = None, log_file: str | Path | None = None,
                    cwd: str | Path | None = None, env: dict[str, str] | None = None, interval: float = 0.05,
                    timeout: float | None = None, heartbeat_s: float = 30.0, check: bool = True,
                    stdout: str | Path | None = None) -> Measurement:
    """Run a command and measure its process tree.

    Output goes to `log_file` (stdout and stderr; else inherited), stdout alone to `stdout` if given."""
    cmd = [str(c) for c in cmd]
    label = label or Path(cmd[0]).name
    logf = open(log_file, "w", encoding="utf-8", errors="replace") if log_file else None
    outf = open(stdout, "wb") if stdout else None
    try:
        if logf:
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=outf or logf,
                                stderr=subprocess.STDOUT if (logf and not outf) else logf)
        s, cpu, timed_out = _watch(proc.pid, label, interval, timeout, _Heartbeat(label, heartbeat_s))
        wall = time.perf_counter() - t0
        rc = proc.wait()
    finally:
        for f in (logf, outf):
            if f:
                f.close()
    m = _measurement(label, s, cpu, rc, wall, error="timed out" if timed_out else None)
    log.info("%s: %s", label, summary(m))
    if check and not m.ok:
        tail = ""
        if log_file:
            lines = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()
            tail = "\nlast lines:\n" + "\n".join(lines[-10:])
        raise MeasuredFailure(f"{label} {'timed out' if timed_out else f'exited with status {rc}'}"
                              f" (log {log_file}); command: {' '.join(cmd)}{tail}", m)
    return m


def measure_call(func: Callable, *args, label: str | None = None, interval: float = 0.05,
                 timeout: float | None = None, heartbeat_s: float = 30.0, check: bool = True,
                 **kwargs) -> Measurement:
    """Call `func(*args, **kwargs)` in a fresh Python interpreter and measure it (and its children).

    `func` must be importable by name (a module-level function); arguments and the return value
    travel pickled. The child's logging goes to stderr like the caller's; its return value comes
    back as `Measurement.result`, an exception as `Measurement.error` (its traceback).
    """
    label = label or getattr(func, "__qualname__", str(func))
    with tempfile.TemporaryDirectory(prefix="procmon-") as tmp:
        call_file, result_file = Path(tmp) / "call.pickle", Path(tmp) / "result.pickle"
        call_file.write_bytes(pickle.dumps((func, args, kwargs)))
        m = measure_command([sys.executable, "-m", "llava_gguf.bench.procmon", call_file, result_file], label=label,
                            interval=interval, timeout=timeout, heartbeat_s=heartbeat_s, check=False)
        if result_file.exists():
            status, value = pickle.loads(result_file.read_bytes())
            if status == "ok":
                m.result = value
            else:
                m.error = value
        elif m.error is None:
            m.error = f"the child exited with status {m.returncode} before returning"
    if check and not m.ok:
        raise MeasuredFailure(f"{label} failed in its child process:\n{m.error}", m)
    return m


def summary(m: Measurement) -> str:
    return (f"{m.wall_s:.1f} s, peak anon {m.peak_anon / GiB:.2f} GiB, peak file-backed {m.peak_file / GiB:.2f} GiB, "
            f"written {m.write_bytes / GiB:.2f} GiB, cpu {m.cpu_s:.1f} s")


def _child_main(call_file: str, result_file: str) -> int:
    """Entry point of `measure_call`'s child: unpickle the call, run it, pickle what happened."""
    setup_logging()
    func, args, kwargs = pickle.loads(Path(call_file).read_bytes())
    try:
        outcome = ("ok", func(*args, **kwargs))
        rc = 0
    except BaseException:  # noqa: BLE001 - the parent reports whatever ended the call
        outcome = ("error", traceback.format_exc())
        rc = 1
    try:
        data = pickle.dumps(outcome)
    except (pickle.PicklingError, TypeError, AttributeError):  # an unpicklable result: keep its text
        data = pickle.dumps((outcome[0], repr(outcome[1])))
    Path(result_file).write_bytes(data)
    return rc


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
