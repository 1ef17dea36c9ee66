"""Hidden partial files: a killed writer's are removed, a live writer's are kept (issue 12, Found 2)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import llava_gguf
from llava_gguf.run import partials, workspace

# A writer in another process: starts an atomic write, says so, then waits for a line on stdin
# (or to be killed) before it finishes.
WRITER = """
import sys
from llava_gguf.run.workspace import atomic_path
with atomic_path(sys.argv[1], suffix=".gguf") as tmp:
    tmp.write_bytes(b"half of a model")
    print(tmp, flush=True)
    sys.stdin.readline()
    tmp.write_bytes(b"a whole model")
"""


def _start_writer(final: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(Path(llava_gguf.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists(), "the writer did not start"
    return proc, tmp


def test_partial_of_a_killed_writer_is_removed(tmp_path):
    final = tmp_path / "models" / "m-F16.gguf"
    proc, tmp = _start_writer(final)
    assert tmp.name.startswith(".m-F16.gguf.") and tmp.name.endswith(".gguf.partial")
    assert partials.find(tmp_path) == [tmp]
    proc.kill()  # as the out-of-memory killer does: no cleanup code runs
    proc.wait()
    assert tmp.exists() and not final.exists()

    assert partials.remove_stale(tmp_path) == [tmp]
    assert not tmp.exists() and partials.find(tmp_path) == []


def test_partial_of_a_live_writer_is_kept_and_completes(tmp_path):
    final = tmp_path / "m-Q8_0.gguf"
    proc, tmp = _start_writer(final)
    try:
        assert not partials.is_stale(tmp)
        assert partials.remove_stale(tmp_path) == []
        assert tmp.exists()
    finally:
        proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0
    assert final.read_bytes() == b"a whole model" and partials.find(tmp_path) == []


def test_own_partials_are_kept_while_writing(tmp_path):
    with workspace.atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
        assert partials.remove_stale(tmp_path) == [] and tmp.exists()
    assert (tmp_path / "x.json").read_text() == "{}"


def test_locked_partial_of_an_unknown_pid_is_kept(tmp_path):
    """A writer whose pid this process cannot see (another container, another host): its lock decides."""
    dead = _dead_pid()
    path = tmp_path / f".m.gguf.{dead}-123.abcdefgh.partial"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        partials.hold(fd)
        assert not partials.is_stale(path)
    finally:
        os.close(fd)
    assert partials.is_stale(path)


def test_reused_pid_does_not_keep_a_partial(tmp_path):
    # This process's pid with another start time: a writer that died and whose pid came back.
    path = tmp_path / f".m.gguf.{os.getpid()}-1.abcdefgh.partial"
    path.write_bytes(b"x")
    if partials._start_time(os.getpid()) is None:
        pytest.skip("no /proc: process start times are unknown here")
    assert partials.remove_stale(tmp_path) == [path]


def test_unmarked_partials_go_when_unlocked(tmp_path):
    """Partials named before writers were recorded in the name (an older version's): the lock decides."""
    loose = tmp_path / "sub" / ".b.gguf.q1w2e3r4.partial"
    held = tmp_path / ".a.gguf.k2j4h5g6.partial"
    loose.parent.mkdir()
    for p in (loose, held):
        p.write_bytes(b"x")
    fd = os.open(held, os.O_RDONLY)
    try:
        partials.hold(fd)
        assert partials.remove_stale(tmp_path) == [loose]
        assert held.exists()
    finally:
        os.close(fd)


def test_only_hidden_partials_are_touched(tmp_path):
    visible = tmp_path / "notes.partial"  # not a hidden temp name: someone's own file
    visible.write_text("keep")
    linked = tmp_path / ".link.partial"
    linked.symlink_to(visible)
    assert partials.find(tmp_path) == []
    assert partials.remove_stale(tmp_path) == [] and visible.exists() and linked.is_symlink()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pid = proc.pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    pytest.skip("the pid was reused at once")


def test_partial_of_a_writer_ended_by_sigterm_is_removed(tmp_path):
    """Python's default SIGTERM action ends the process without unwinding: the atomic block's
    cleanup never runs, so the rerun's sweep must remove the partial."""
    final = tmp_path / "m.gguf"
    proc, tmp = _start_writer(final)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    assert tmp.exists()
    assert partials.remove_stale(tmp_path) == [tmp]
    assert partials.find(tmp_path) == [] and not final.exists()
