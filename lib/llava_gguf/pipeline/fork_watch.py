"""qemu-user's fork hazard in the arm64 rehearsal: a child forked from a many-threaded guest process
that never reaches exec.

Under qemu-user, a fork from a process with many threads (a Jupyter kernel has ~18) can leave the
child blocked on a lock that another thread held at the moment of the fork, before it execs the
tool (mamba-org/mamba#1611 and python/cpython#120998 describe the same shape). Seen in this
project's rehearsal: step 04's llama-debug child sat 30 minutes in futex_wait, its command line
still the kernel's, with 0 s of CPU, while the step waited for it. It is the emulator, not the
board: nothing of it reaches a real aarch64 machine, so the rehearsal, not the library, handles it.

`ForkWatch` scans the host's processes while `make all` runs in the root. A process is a stuck
fork when it runs under qemu's aarch64 interpreter, its command line is still its parent's (it
never exec'd), it has lived longer than `min_age_s`, and it has used almost no CPU. The watch
kills it: the step's tool then fails (signal 9), and the rehearsal runs `make all` again, which
skips every step already done (their fingerprints), so only the interrupted step reruns.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import psutil

log = logging.getLogger(__name__)

QEMU_INTERPRETER = "aarch64-binfmt"  # /usr/libexec/qemu-binfmt/aarch64-binfmt-P (qemu-user-static)
MIN_AGE_S = 300.0  # no tool launch takes this long to exec, even under qemu
MAX_CPU_S = 1.0    # a child running Python or a tool would have used more by then


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    cmdline: tuple[str, ...]
    age_s: float
    cpu_s: float


def stuck_forks(procs: Iterable[ProcInfo], min_age_s: float = MIN_AGE_S, max_cpu_s: float = MAX_CPU_S) -> list[ProcInfo]:
    """The processes of `procs` that are forks of an emulated process and never exec'd."""
    procs = list(procs)
    by_pid = {p.pid: p for p in procs}
    out = []
    for p in procs:
        parent = by_pid.get(p.ppid)
        if (parent is not None and p.cmdline and p.cmdline == parent.cmdline
                and QEMU_INTERPRETER in p.cmdline[0]
                and p.age_s >= min_age_s and p.cpu_s <= max_cpu_s):
            out.append(p)
    return out


def host_processes() -> list[ProcInfo]:
    """Every process of this host as ProcInfo (those that vanish while being read are left out)."""
    now, out = time.time(), []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "cpu_times"]):
        info = proc.info
        if not info.get("cmdline") or info.get("cpu_times") is None:
            continue
        cpu = info["cpu_times"]
        out.append(ProcInfo(info["pid"], info["ppid"], tuple(info["cmdline"]), now - info["create_time"],
                            cpu.user + cpu.system))
    return out


def _kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.NoSuchProcess:
        pass


@dataclass
class ForkWatch:
    """`with ForkWatch() as watch:` scans every `interval_s` and kills stuck forks; `watch.killed`
    lists them (ProcInfo) for the rehearsal's log and summary."""

    interval_s: float = 30.0
    min_age_s: float = MIN_AGE_S
    processes: Callable[[], list[ProcInfo]] = host_processes
    kill: Callable[[int], None] = _kill
    killed: list[ProcInfo] = field(default_factory=list)

    def scan(self) -> list[ProcInfo]:
        found = stuck_forks(self.processes(), self.min_age_s)
        for p in found:
            log.warning("qemu-user fork deadlock: pid %d (a fork of pid %d, %s) has not exec'd after %.0f s "
                        "with %.1f s of CPU; killing it so that the step fails and make all runs again",
                        p.pid, p.ppid, " ".join(p.cmdline[1:4]), p.age_s, p.cpu_s)
            self.kill(p.pid)
            self.killed.append(p)
        return found

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.scan()

    def __enter__(self) -> "ForkWatch":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fork-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)


def run_watched(run: Callable[[], None], retries: int, watch: ForkWatch | None = None) -> ForkWatch:
    """`run()` (e.g. `make all` in the root) under a ForkWatch; run again (the steps done are
    skipped) after a failure that followed a killed stuck fork, at most `retries` times. A failure
    with no stuck fork behind it raises at once. Returns the watch (its `killed`)."""
    watch = watch or ForkWatch()
    attempt = 0
    with watch:
        while True:
            before = len(watch.killed)
            try:
                run()
                return watch
            except RuntimeError:
                if len(watch.killed) == before or attempt == retries:
                    raise
                attempt += 1
                log.warning("the run failed after a qemu fork deadlock was broken; running it again (%d of %d)",
                            attempt, retries)
