"""The one way a tool runs: in a process group of its own, under a time limit, its log kept.

Every llama.cpp tool, build command and legacy script goes through `run_tool` (the timed
llama-mtmd-cli runs stream through mtmd.py and llama-server runs until it is stopped: both are killed
the same way). A tool starts as the leader of a new process group, so whatever it starts (cmake's
compilers, a script's workers) belongs to the group too. When it runs past its limit (limits.py), or
the caller is interrupted, the whole group is killed and `ToolFailed` names the tool, the limit and
the last lines of its log. Callers give tools temporary output names (workspace.atomic_path) and
rename them only after success, so a killed tool leaves nothing complete-looking behind.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

import psutil

from . import limits

log = logging.getLogger(__name__)

TAIL_LINES = 8


class ToolFailed(RuntimeError):
    """A tool exited non-zero, crashed or ran past its limit; its log is kept."""

    def __init__(self, message: str, log_file: Path | None):
        super().__init__(message)
        self.log_file = log_file


# ----------------------------------------------------------------------------- processes
def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (every tool here is started as a group leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_tree(pid: int, include_root: bool = True) -> None:
    """SIGKILL a process (unless not `include_root`), every descendant, and the process groups they
    lead (a tool's own group).

    The descendants are collected first: once their parent is dead they are re-parented and no
    longer found. This process's own group is never signalled, nor the root's without the root."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = set()
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(p.pid))
    spared = {os.getpgrp()} | (set() if include_root else {group_of(pid)})
    if not include_root:
        procs = procs[1:]
    for group in groups - spared:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()


def group_of(pid: int) -> int | None:
    """The process group of `pid` (None once it is gone)."""
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class Supervised:
    """A started tool and its deadline: at `limit` seconds its process group is killed."""

    def __init__(self, proc: subprocess.Popen, limit: float):
        self.proc, self.limit, self.expired, self.finished = proc, limit, False, False
        self._timer = threading.Timer(limit, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        # The leader may have exited while a process it started (in its group) still holds its output
        # pipe: the caller is then still reading, so the group is killed all the same.
        if self.proc.poll() is None or not self.finished:
            self.expired = True
            log.error("%s ran past its limit of %s; killing its process group", Path(self.proc.args[0]).name,
                      _seconds(self.limit))
            kill_group(self.proc)

    def cancel(self) -> None:
        self._timer.cancel()


@contextlib.contextmanager
def supervised(cmd: list[str], limit: float, **popen) -> Iterator[Supervised]:
    """Start `cmd` as the leader of a new process group; the group is killed at `limit` seconds, when
    the block ends with an exception (an interrupted notebook leaves no tool running) and after the
    tool has ended (nothing it started outlives it)."""
    proc = subprocess.Popen(cmd, process_group=0, **popen)
    run = Supervised(proc, limit)
    try:
        yield run
        proc.wait()
        run.finished = True
        # Whatever the tool left running in its group (a worker it did not wait for) is not the caller's:
        # it goes with the tool (the group outlives its reaped leader only through such leftovers).
        kill_group(proc)
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    finally:
        run.cancel()


# ----------------------------------------------------------------------------- the runner
def run_tool(cmd: list, log_file: Path | None = None, timeout: float | None = None, what: str = "", *,
             env: dict | None = None, stdin_text: str | None = None, capture: bool = False,
             expect: str | None = None, cwd: Path | None = None, append: bool = False,
             on_line: Callable[[str], None] | None = None):
    """Run a tool, the one way every step does.

    `timeout`: its limit in seconds (limits.seconds, scaled to the work); None takes the base
    limit of the command's name in limits.LIMITS. With `log_file` (the default use) stdout+stderr go
    to that file (`append`: after what it holds), kept also on failure, and the log text is returned;
    `on_line` also receives each line as it comes (a progress bar). With `capture=True` (tools whose
    stdout is the result: token ids, a chat template) the CompletedProcess is returned with stdout and
    stderr apart. Either way a non-zero exit, a crash or the limit raises ToolFailed naming the tool,
    how it ended (the limit) and the output's last lines.
    `expect` names text the finished log must hold (the result line a caller parses). A build
    without patch 0003 can exit 0 with its last log lines lost (llama.cpp's log worker is never
    joined, upstream #22142), so when it is missing the tool runs once more.
    """
    cmd = [str(c) for c in cmd]
    what = what or Path(cmd[0]).name
    limit = limits.seconds(Path(cmd[0]).name) if timeout is None else float(timeout)
    env = {**os.environ, **env} if env else None
    log.debug("running %s (limit %s)", " ".join(cmd), _seconds(limit))
    if capture:
        return _run_captured(cmd, limit, what, env, stdin_text, cwd)
    text = _run_logged(cmd, Path(log_file), limit, what, env, stdin_text, cwd, append, on_line)
    if expect is not None and expect not in text:
        log.warning("%s exited 0 but its log %s lacks %r: llama.cpp's log can drop its last lines at exit "
                    "(a build without patches/llama.cpp/0003); running it once more", what, log_file, expect)
        text = _run_logged(cmd, Path(log_file), limit, what, env, stdin_text, cwd, append, on_line)
    return text


def _run_captured(cmd: list[str], limit: float, what: str, env, stdin_text: str | None, cwd) -> subprocess.CompletedProcess:
    stdin = subprocess.DEVNULL if stdin_text is None else subprocess.PIPE
    with supervised(cmd, limit, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    errors="replace", env=env, cwd=cwd) as run:
        out, err = run.proc.communicate(stdin_text)
    if run.proc.returncode == 0 and not run.expired:
        return subprocess.CompletedProcess(cmd, 0, out, err)
    raise ToolFailed(_failure(what, cmd, run, err or out, None), None)


def _run_logged(cmd: list[str], log_file: Path, limit: float, what: str, env, stdin_text: str | None, cwd,
                append: bool, on_line) -> str:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = log_file.stat().st_size if append and log_file.exists() else 0
    with open(log_file, "a" if append else "w", encoding="utf-8", errors="replace") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        stdin = subprocess.DEVNULL if stdin_text is None else subprocess.PIPE
        out = subprocess.PIPE if on_line else f
        with supervised(cmd, limit, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, text=True,
                        errors="replace", env=env, cwd=cwd) as run:
            if on_line:
                if stdin_text is not None:
                    run.proc.stdin.write(stdin_text)
                    run.proc.stdin.close()
                for line in run.proc.stdout:
                    f.write(line)
                    on_line(line)
            elif stdin_text is not None:
                run.proc.communicate(stdin_text)
    with open(log_file, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        text = f.read()
    if run.proc.returncode == 0 and not run.expired:
        return text
    raise ToolFailed(_failure(what, cmd, run, text, log_file), log_file)


# ----------------------------------------------------------------------------- messages
def _seconds(limit: float) -> str:
    return f"{limit:.0f} s" if limit >= 10 else f"{limit:.3g} s"


def _ended(rc: int | None) -> str:
    """How a process ended, from its return code."""
    if rc is None:
        return "did not end"
    if rc < 0:
        return f"crashed ({signal.Signals(-rc).name})" if -rc in signal.valid_signals() else f"killed ({rc})"
    return f"exited with status {rc}"


def _failure(what: str, cmd: list[str], run: Supervised, output: str, log_file: Path | None) -> str:
    how = (f"ran past its limit of {_seconds(run.limit)} and was stopped (its process group killed)"
           if run.expired else _ended(run.proc.returncode))
    kept = f"; full log kept at {log_file}" if log_file else ""
    tail = "\n".join(output.strip().splitlines()[-TAIL_LINES:])
    return f"{what} {how}{kept}\ncommand: {' '.join(cmd)}\nlast lines:\n{tail}"
