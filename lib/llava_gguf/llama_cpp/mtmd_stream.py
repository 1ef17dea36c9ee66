"""One llama-mtmd-cli process, read as it runs: both pipes into its log, each stdout read stamped.

mtmd.py's `run_mtmd` checks the inputs, calls `stream_run` and turns what it returns into an
`EvalRun`; why each stdout read is one token piece, and what the stamps are compared with, is in
mtmd.py's module docstring. Kept apart from it so that the parts that touch the process (spawn, the
read loop, the kill on timeout or interrupt, wait4) are read on their own.
"""
from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..run.machine_load import LoadProbe
from ..run.params import EvaluateParams
from .runner import kill_group

log = logging.getLogger(__name__)

READ_SIZE = 65536
# The tool's stderr line once both models are loaded: ttft_after_load_ms counts from it.
LOADED_LINE = b"main: loading model"


@dataclass
class Streamed:
    """What a finished run left behind, before its log is parsed."""

    chunks: list[tuple[float, bytes]]  # each stdout read: (seconds since the spawn, bytes)
    loaded_at: float | None  # when LOADED_LINE arrived, seconds since the spawn
    timed_out: bool  # killed for running past evaluate.timeout_s
    returncode: int
    wall_s: float
    peak_rss_mib: float
    load: dict  # what it ran under (machine_load.py)


def stream_run(cmd: list[str], log_path: Path, evaluate: EvaluateParams) -> Streamed:
    """Spawn the tool and read its pipes to their end, writing everything to log_path as it arrives.

    The clock and the load probe start right before the spawn and stop right after `wait4`, so the
    wall time, the peak memory (wait4's rusage) and the load are this child's alone. The pipes are
    unbuffered (bufsize=0) so that a read returns what the tool flushed, when it flushed it.
    """
    with open(log_path, "wb") as logf:
        t0, probe = time.perf_counter(), LoadProbe().start()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                bufsize=0, start_new_session=True)
        reader = _PipeReader(logf, t0)
        timed_out = _read_to_end(proc, reader, evaluate.timeout_s)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        load = probe.stop(usage.ru_utime + usage.ru_stime, evaluate.load_threshold)
    proc.stdout.close()
    proc.stderr.close()
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    peak = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return Streamed(reader.chunks, reader.loaded_at, timed_out, proc.returncode, wall, peak, load)


def _read_to_end(proc: subprocess.Popen, reader: _PipeReader, timeout_s: float) -> bool:
    """Read both pipes until the tool has closed them; True if it ran past timeout_s and was killed.

    A timeout kills the process group but keeps reading, so the log holds all the tool wrote before
    the caller's error quotes it. Any exception (^C in a notebook included) kills the group and waits
    for it before it propagates: the tool must not outlive the run that started it.
    """
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    open_streams, timed_out = 2, False
    try:
        while open_streams:
            for key, _ in sel.select(timeout=0.5):
                if not reader.read(key.fd, key.data):
                    sel.unregister(key.fileobj)
                    open_streams -= 1
            reader.logf.flush()
            if timeout_s and time.perf_counter() - reader.t0 > timeout_s and not timed_out:
                timed_out = True
                log.error("llama-mtmd-cli ran past %ss; killing it", timeout_s)
                kill_group(proc)
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    finally:
        sel.close()
    return timed_out


class _PipeReader:
    """Each read of the two pipes, into the log in arrival order.

    Stdout reads (the token pieces) are kept with their arrival time. Stderr is written in whole
    lines only, so a piece never lands inside a log line (the timings are parsed from those lines),
    and is watched for LOADED_LINE.
    """

    def __init__(self, logf: BinaryIO, t0: float):
        self.logf, self.t0 = logf, t0
        self.chunks: list[tuple[float, bytes]] = []
        self.loaded_at: float | None = None
        self._err_partial = b""

    def read(self, fd: int, stream: str) -> bool:
        """One read of `stream` ("out" or "err"); False at its end (a partial last stderr line is written then)."""
        data = os.read(fd, READ_SIZE)
        now = time.perf_counter() - self.t0
        if not data:
            if stream == "err" and self._err_partial:
                self.logf.write(self._err_partial)
                self._err_partial = b""
            return False
        if stream == "out":
            self.chunks.append((now, data))
            self.logf.write(data)
            return True
        self._err_partial += data
        cut = self._err_partial.rfind(b"\n") + 1
        if cut:
            lines, self._err_partial = self._err_partial[:cut], self._err_partial[cut:]
            if self.loaded_at is None and LOADED_LINE in lines:
                self.loaded_at = now
            self.logf.write(lines)
        return True
