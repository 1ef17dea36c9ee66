"""The load a timed run ran under (machine_load.py): /proc/stat read against a faked sequence, the
under-load rule, its summary in words, and a real run_mtmd record carrying it."""
from __future__ import annotations

import sys

import pytest

from llava_gguf.run import machine_load as load

# /proc/stat as a 2-CPU Linux writes it: user nice system idle iowait irq softirq steal guest guest_nice.
STAT = """cpu  {user} {nice} {system} {idle} 50 {irq} {softirq} {steal} 7 0
cpu0 1 2 3 4 5 6 7 8 0 0
cpu1 1 2 3 4 5 6 7 8 0 0
intr 123456 0 0
ctxt 987654
btime 1700000000
"""


def _stat(user, nice=0, system=0, idle=0, irq=0, softirq=0, steal=0):
    return STAT.format(user=user, nice=nice, system=system, idle=idle, irq=irq, softirq=softirq, steal=steal)


def _probe(stats: list[str], loads=(1.9, 2.1), self_cpu=(10.0, 10.1), clock=(100.0, 102.0)):
    """A LoadProbe reading these /proc/stat texts, load averages, own CPU times and clock, in turn."""
    seq = {"stat": list(stats), "load": list(loads), "self": list(self_cpu), "clock": list(clock)}
    return load.LoadProbe(read_stat=lambda: seq["stat"].pop(0), loadavg=lambda: seq["load"].pop(0),
                          self_cpu=lambda: seq["self"].pop(0), clock=lambda: seq["clock"].pop(0), tick_hz=100)


def test_parse_stat_reads_the_aggregate_line_only():
    cpu = load.parse_stat(_stat(user=1000, nice=10, system=200, idle=5000, irq=3, softirq=7, steal=40))
    assert cpu == load.CpuTimes(busy=1000 + 10 + 200 + 3 + 7 + 40, steal=40,
                                total=1000 + 10 + 200 + 5000 + 50 + 3 + 7 + 40)  # guest (7) is inside user
    assert load.parse_stat("cpu0 1 2 3 4\nintr 5\n") is None and load.parse_stat("") is None
    assert load.parse_stat("cpu  1 2 3 4\n") == load.CpuTimes(busy=6, steal=0, total=10)  # an old kernel's 4 fields


def test_others_cpu_time_is_busy_minus_the_child_and_the_reader():
    # 2 s of wall time on 2 CPUs (400 ticks): 250 busy ticks = 2.5 s, of which the child took 1.6 s
    # and this process 0.1 s: 0.8 s others (steal 0.2 s of it), 0.4 cores.
    before = _stat(user=1000, system=100, idle=4000, steal=10)
    after = _stat(user=1200, system=130, idle=4150, steal=30)
    rec = _probe([before, after]).start().stop(child_cpu_s=1.6, threshold=0.25)
    assert rec["loadavg_start"] == 1.9 and rec["loadavg_end"] == 2.1 and rec["wall_s"] == 2.0
    assert rec["busy_s"] == pytest.approx(2.5) and rec["self_cpu_s"] == pytest.approx(0.1)
    assert rec["others_cpu_s"] == pytest.approx(0.8) and rec["others_cores"] == pytest.approx(0.4)
    assert rec["steal_s"] == pytest.approx(0.2) and rec["steal_pct"] == pytest.approx(100 * 20 / 400)
    assert rec["under_load"] is True and rec["threshold_cores"] == 0.25
    # The same run with nothing else on the machine: busy = the child + the reader, not under load.
    quiet = _probe([before, _stat(user=1150, system=120, idle=4230, steal=10)]).start().stop(1.6)
    assert quiet["others_cpu_s"] == pytest.approx(0.0) and quiet["under_load"] is False and quiet["steal_pct"] == 0
    # Coarse ticks can make busy < child: clipped at 0, never negative.
    clipped = _probe([before, _stat(user=1100, system=110, idle=4290, steal=10)]).start().stop(1.6)
    assert clipped["others_cpu_s"] == 0.0 and clipped["under_load"] is False
    # A higher threshold: the loaded run above passes.
    assert _probe([before, after]).start().stop(1.6, threshold=0.5)["under_load"] is False


def test_without_proc_stat_nothing_is_judged():
    rec = _probe([None, None], loads=(None, None)).start().stop(1.0)
    assert rec["others_cpu_s"] is None and rec["under_load"] is None and rec["loadavg_start"] is None
    assert load.describe(load.summarize([rec])) == "load not recorded (no /proc/stat)"


def test_summary_and_words():
    rows = [{"loadavg_start": 1.9, "others_cores": 0.05, "steal_pct": 3.0, "under_load": False},
            {"loadavg_start": 2.3, "others_cores": 0.9, "steal_pct": 2.0, "under_load": True},
            {"loadavg_start": 1.7, "others_cores": 0.02, "steal_pct": 4.0, "under_load": False}]
    s = load.summarize(rows)
    assert s == {"runs": 3, "runs_under_load": 1, "runs_judged": 3, "loadavg": 1.9, "others_cores": 0.05,
                 "steal_pct": 3.0}
    assert load.describe(s) == ("measured at load 1.9 (1-min average), other processes 0.05 cores, 3 % steal; "
                                "1 of 3 runs under load (other processes over 0.25 cores)")
    assert load.describe(load.summarize(rows[:1])).endswith("; no run under load")
    assert load.describe(load.merge(s, load.summarize(rows[1:2])), 0.5).endswith("2 of 4 runs under load "
                                                                                  "(other processes over 0.5 cores)")
    assert load.loaded({"under_load": True}) and load.loaded({"runs_under_load": 2})
    assert not load.loaded({"under_load": None}) and not load.loaded({"runs_under_load": float("nan")})
    assert load.mark("Q4_K_M", True) == "Q4_K_M (under load)" and load.mark("Q4_K_M", False) == "Q4_K_M"


def test_retry_note_says_what_the_confirmation_did():
    assert load.retry_note([{"phase": "confirm", "under_load": False}], 2) == "no confirmation run was under load"
    rows = [{"phase": load.DROPPED, "under_load": True}, {"phase": load.DROPPED, "under_load": True},
            {"phase": "confirm", "under_load": True}, {"phase": "confirm", "under_load": False}]
    assert load.retry_note(rows, 2) == ("2 confirmation runs taken under load dropped and run again; 1 run still "
                                        "under load after 2 retries per configuration kept and marked "
                                        "(tune.load_retries)")


def test_a_real_child_run_records_its_load(tmp_path):
    """run_mtmd's probe around a real child: a CPU-bound Python child's own time is not others' time."""
    import os
    import subprocess

    probe = load.LoadProbe().start()
    proc = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.5: pass"])
    _, _, usage = os.wait4(proc.pid, 0)
    rec = probe.stop(usage.ru_utime + usage.ru_stime)
    assert rec["child_cpu_s"] >= 0.45 and rec["wall_s"] >= rec["child_cpu_s"] - 0.05
    if os.path.exists("/proc/stat"):
        assert rec["others_cpu_s"] is not None and rec["others_cpu_s"] >= 0 and rec["under_load"] in (True, False)
        assert set(load.FIELDS) <= set(rec)


def test_run_mtmd_records_the_load_and_marks_a_run_beside_a_cpu_hog(tmp_path):
    """Every timed tool run carries `load` (run_mtmd is where evaluate, tune and bench time runs):
    a fake tool that sleeps beside a busy loop is a run under load."""
    import subprocess

    from llava_gguf.llama_cpp.mtmd import MtmdOptions, run_mtmd
    from llava_gguf.run.params import EvaluateParams

    files = {n: tmp_path / n for n in ("text.gguf", "mmproj.gguf", "image.jpg")}
    for p in files.values():
        p.write_bytes(b"GGUF")
    tool = tmp_path / "llama-mtmd-cli"
    tool.write_text("#!/bin/sh\nsleep 0.6\nprintf '\\nA cat\\n\\n'\n")
    tool.chmod(0o755)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        r = run_mtmd(tool, files["text.gguf"], files["mmproj.gguf"], files["image.jpg"], "Hi",
                     MtmdOptions(EvaluateParams(n_predict=4, load_threshold=0.25)), tmp_path / "run.log")
    finally:
        hog.kill()
        hog.wait()
    row = r.summary()
    assert set(load.FIELDS) <= set(row) and r.to_dict()["load"]["threshold_cores"] == 0.25
    if load.parse_stat(load.PROC_STAT.read_text() if load.PROC_STAT.exists() else "") is None:
        pytest.skip("no /proc/stat here")
    assert r.load["child_cpu_s"] < 0.3 and r.load["others_cores"] > 0.25, r.load
    assert row["under_load"] is True
