"""The arm64 rehearsal's watch for qemu-user's fork deadlock (pipeline/fork_watch.py), on a faked
process table shaped like the one seen: a Jupyter kernel under qemu whose llama-debug child never
exec'd."""
from __future__ import annotations

import pytest

from llava_gguf.pipeline import fork_watch
from llava_gguf.pipeline.fork_watch import ForkWatch, ProcInfo, run_watched, stuck_forks

QEMU = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
KERNEL = (QEMU, "/root/llava-gguf/.venv/bin/python", "/root/llava-gguf/.venv/bin/python", "-m", "ipykernel_launcher")


def _table(stuck_age=1800.0, stuck_cpu=0.0):
    return [
        ProcInfo(6253, 4647, (QEMU, ".venv/bin/python", ".venv/bin/python", "-m", "llava_gguf", "run", "all"), 2200, 40),
        ProcInfo(10280, 6253, KERNEL, 1790, 120.0),
        ProcInfo(11203, 10280, KERNEL, stuck_age, stuck_cpu),                      # forked, never exec'd
        ProcInfo(11300, 10280, (QEMU, "/opt/llama.cpp/bin/llama-debug", "-m", "x.gguf"), 900, 30.0),  # exec'd
        ProcInfo(11400, 10280, KERNEL, 1200, 25.0),                                # a fork that works
        ProcInfo(500, 1, ("/usr/bin/python3", "worker.py"), 5000, 0.0),
        ProcInfo(501, 500, ("/usr/bin/python3", "worker.py"), 5000, 0.0),           # not emulated: left alone
    ]


def test_a_fork_that_never_execd_is_found_and_nothing_else():
    assert [p.pid for p in stuck_forks(_table())] == [11203]
    assert stuck_forks(_table(stuck_age=120.0)) == []   # young: a launch may still be on its way
    assert stuck_forks(_table(stuck_cpu=8.0)) == []     # it is running code: not stuck


def test_the_watch_kills_the_stuck_fork_once_and_records_it():
    killed = []
    table = _table()
    watch = ForkWatch(processes=lambda: [p for p in table if p.pid not in killed], kill=killed.append)
    assert [p.pid for p in watch.scan()] == [11203]
    assert watch.scan() == [] and killed == [11203] and [p.pid for p in watch.killed] == [11203]


def _watch(table):
    killed = []
    return ForkWatch(interval_s=3600, processes=lambda: [p for p in table() if p.pid not in killed],
                     kill=killed.append)


def test_make_all_runs_again_after_a_broken_deadlock_and_only_then():
    calls = []
    watch = _watch(_table)

    def make_all():
        calls.append(len(calls))
        if len(calls) == 1:
            watch.scan()  # what the watch's thread does while the step hangs
            raise RuntimeError("make all exited 2")
    assert run_watched(make_all, retries=2, watch=watch) is watch
    assert calls == [0, 1] and [p.pid for p in watch.killed] == [11203]

    def broken():
        raise RuntimeError("make all exited 2: a real failure")
    plain = _watch(lambda: [])
    with pytest.raises(RuntimeError, match="a real failure"):
        run_watched(broken, retries=2, watch=plain)


def test_the_retries_are_bounded():
    pids = iter(range(20000, 20010))
    calls = []
    watch = _watch(lambda: [])

    def always_stuck():
        calls.append(1)
        stuck = ProcInfo(next(pids), 10280, KERNEL, 1800, 0.0)
        watch.processes = lambda: [ProcInfo(10280, 6253, KERNEL, 1790, 120.0), stuck]
        watch.scan()
        raise RuntimeError("make all exited 2")
    with pytest.raises(RuntimeError):
        run_watched(always_stuck, retries=2, watch=watch)
    assert len(calls) == 3 and len(watch.killed) == 3


def test_the_host_table_reads_this_process():
    me = [p for p in fork_watch.host_processes() if p.cmdline and "pytest" in " ".join(p.cmdline)]
    assert me and all(p.age_s >= 0 and p.cpu_s >= 0 for p in me)
