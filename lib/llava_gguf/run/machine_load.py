"""The load a timed run ran under, and the one rule that calls a run "under load".

Every llama-mtmd-cli run that is timed (steps 06 and 07, `make bench`'s image runs) goes through
`llama_cpp.mtmd.run_mtmd`, which wraps the child in a `LoadProbe` and records what `LoadProbe.stop`
returns as the run's `load`:

- `loadavg_start`, `loadavg_end`: the 1-minute load average when the run started and ended. It
  counts the measured tool's own threads too (back-to-back runs of a 2-thread tool raise it towards
  2 by themselves), so it says how busy the machine was, not who made it busy.
- `others_cpu_s`: the CPU time the rest of the machine took during the run. /proc/stat's aggregate
  `cpu` line holds, in USER_HZ ticks summed over all CPUs, `user nice system idle iowait irq softirq
  steal guest guest_nice` (guest time is already inside user and nice, so it is not added again).
  Busy = user + nice + system + irq + softirq + steal, read at the start and at the end; then

      others_cpu_s = busy delta - the child tree's CPU time - this process's own CPU time

  The child tree's time is `wait4`'s rusage (the tool and its reaped children, user + system); this
  process (the reader of the tool's output) is the measurement, not load. Ticks are coarse (10 ms
  per CPU), so the difference is clipped at 0.
- `others_cores` = others_cpu_s / wall time: how many cores other work kept busy on average.
- `steal_s`, `steal_pct`: the time the hypervisor gave to other guests (already inside busy, so in
  others_cpu_s too), and its share of all CPUs' time during the run.

THE RULE (`under_load`): a run is under load when others_cores > `threshold` (params
`evaluate.load_threshold`, default 0.25: a quarter of one core busy with other work, steal included,
on average over the run). Without /proc/stat (not Linux) the figures are None and no run is judged.

`summarize` folds the runs behind a figure into what a headline states ("measured at load 1.9,
other processes 0.05 cores, 0 % steal; no run under load"), `describe` words it, and `mark` /
`HATCH` are how tables and plots mark a run or a configuration measured under load.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .formatting import plural

DEFAULT_THRESHOLD = 0.25  # cores
PROC_STAT = Path("/proc/stat")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# The per-run columns a runs table carries (EvalRun.summary).
FIELDS = ("loadavg_start", "loadavg_end", "others_cpu_s", "others_cores", "steal_pct", "under_load")
MARK = "under load"
HATCH = "xx"  # bars of a configuration measured under load


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in ticks summed over all CPUs."""

    busy: int   # user + nice + system + irq + softirq + steal
    steal: int
    total: int  # the first eight fields: busy + idle + iowait


def parse_stat(text: str) -> CpuTimes | None:
    """The aggregate `cpu ` line of a /proc/stat text; None when it has none."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]] + [0] * 10
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            return CpuTimes(busy=user + nice + system + irq + softirq + steal, steal=steal,
                            total=user + nice + system + idle + iowait + irq + softirq + steal)
    return None


def _read_stat() -> str | None:
    try:
        return PROC_STAT.read_text()
    except OSError:
        return None


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def under_load(others_cores: float | None, threshold: float = DEFAULT_THRESHOLD) -> bool | None:
    """THE RULE: other work kept more than `threshold` cores busy on average (None: not known)."""
    if others_cores is None or not math.isfinite(others_cores):
        return None
    return others_cores > threshold


class LoadProbe:
    """`probe = LoadProbe().start()` before the child starts, `probe.stop(child_cpu_s)` once it is
    reaped. The readers are parameters so that a test can feed a faked /proc/stat sequence."""

    def __init__(self, read_stat: Callable[[], str | None] = _read_stat,
                 loadavg: Callable[[], float | None] = _loadavg, self_cpu: Callable[[], float] = _self_cpu,
                 clock: Callable[[], float] = time.perf_counter, tick_hz: int = CLK_TCK):
        self._read_stat, self._loadavg, self._self_cpu, self._clock = read_stat, loadavg, self_cpu, clock
        self.tick_hz = tick_hz

    def start(self) -> "LoadProbe":
        self._load0, self._self0, self._t0 = self._loadavg(), self._self_cpu(), self._clock()
        self._cpu0 = parse_stat(self._read_stat() or "")
        return self

    def stop(self, child_cpu_s: float, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
        cpu1, wall = parse_stat(self._read_stat() or ""), self._clock() - self._t0
        self_s = self._self_cpu() - self._self0
        out: dict[str, Any] = {"loadavg_start": self._load0, "loadavg_end": self._loadavg(), "wall_s": wall,
                               "child_cpu_s": child_cpu_s, "self_cpu_s": self_s, "busy_s": None,
                               "others_cpu_s": None, "others_cores": None, "steal_s": None, "steal_pct": None,
                               "threshold_cores": threshold, "under_load": None, "source": str(PROC_STAT)}
        if self._cpu0 is None or cpu1 is None:
            return out
        busy = (cpu1.busy - self._cpu0.busy) / self.tick_hz
        others = max(0.0, busy - child_cpu_s - self_s)
        total = cpu1.total - self._cpu0.total
        out.update(busy_s=busy, others_cpu_s=others, others_cores=others / wall if wall > 0 else None,
                   steal_s=(cpu1.steal - self._cpu0.steal) / self.tick_hz,
                   steal_pct=100.0 * (cpu1.steal - self._cpu0.steal) / total if total > 0 else 0.0)
        out["under_load"] = under_load(out["others_cores"], threshold)
        return out


def row_fields(load: Mapping[str, Any] | None) -> dict[str, Any]:
    """The per-run columns of a runs table (FIELDS) from a run's load record."""
    load = load or {}
    return {k: load.get(k) for k in FIELDS}


# ----------------------------------------------------------------------------- over several runs
def _get(row: Any, key: str) -> Any:
    """A field of a dict, a pandas row or an object; NaN is None, a numpy scalar a Python one."""
    value = row.get(key) if hasattr(row, "get") else getattr(row, key, None)
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(rows: Iterable[Any]) -> dict[str, Any]:
    """What the runs behind one figure ran under: medians of their load average (at start),
    others' cores and steal share, and how many of them were under load."""
    rows = list(rows)
    flags = [_get(r, "under_load") for r in rows]
    return {"runs": len(rows), "runs_under_load": sum(1 for f in flags if f is True),
            "runs_judged": sum(1 for f in flags if f is not None),
            "loadavg": _median(_get(r, "loadavg_start") for r in rows),
            "others_cores": _median(_get(r, "others_cores") for r in rows),
            "steal_pct": _median(_get(r, "steal_pct") for r in rows)}


def merge(*summaries: Mapping[str, Any] | None) -> dict[str, Any]:
    """Several summaries as one (counts added, medians of the medians): e.g. a recommendation's runs
    and the seed's command's, which a headline compares."""
    parts = [s for s in summaries if s]
    return {"runs": sum(int(s.get("runs") or 0) for s in parts),
            "runs_under_load": sum(int(s.get("runs_under_load") or 0) for s in parts),
            "runs_judged": sum(int(s.get("runs_judged") or 0) for s in parts),
            **{k: _median(s.get(k) for s in parts) for k in ("loadavg", "others_cores", "steal_pct")}}


# ----------------------------------------------------------------------------- step 07's reruns
DROPPED = "confirm-dropped"  # the phase of a confirmation run dropped for load (and run again)


def config_columns(runs: list[Mapping[str, Any]], reruns: int) -> dict[str, Any]:
    """A confirmed configuration's load columns, over the runs it kept: counts and medians."""
    s = summarize(runs)
    return {"runs_under_load": s["runs_under_load"], "runs_judged": s["runs_judged"], "reruns": reruns,
            "loadavg": s["loadavg"], "others_cores": s["others_cores"], "steal_pct": s["steal_pct"]}


def config_summary(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """`summarize`'s shape from a confirmed configuration's columns (config_columns)."""
    row = row or {}
    return {"runs": int(_get(row, "runs") or 0), "runs_under_load": int(_get(row, "runs_under_load") or 0),
            "runs_judged": int(_get(row, "runs_judged") or 0), "reruns": int(_get(row, "reruns") or 0),
            **{k: _get(row, k) for k in ("loadavg", "others_cores", "steal_pct")}}


def retry_note(rows: Iterable[Mapping[str, Any]], retries: int) -> str:
    """What the confirmation did about load, in one sentence (step 07's log and report)."""
    rows = list(rows)
    dropped = sum(1 for r in rows if r.get("phase") == DROPPED)
    kept = sum(1 for r in rows if r.get("phase") == "confirm" and r.get("under_load") is True)
    if not dropped and not kept:
        return "no confirmation run was under load"
    parts = []
    if dropped:
        parts.append(f"{plural(dropped, 'confirmation run')} taken under load dropped and run again")
    if kept:
        parts.append(f"{plural(kept, 'run')} still under load after {plural(retries, 'retry', 'retries')} "
                     "per configuration kept and marked")
    return "; ".join(parts) + " (tune.load_retries)"


def threshold_of(info: Mapping[str, Any] | None, key: str = "load_threshold") -> float:
    """The threshold a file recorded (recommended.json's setup, summary.json), else the default."""
    value = (info or {}).get(key)
    return float(value) if value is not None else DEFAULT_THRESHOLD


def loaded(row: Any) -> bool:
    """Whether a run (under_load) or a configuration's runs (runs_under_load > 0) were under load."""
    flag, count = _get(row, "under_load"), _get(row, "runs_under_load")
    return flag is True or bool(count and count > 0)


def mark(label: str, is_loaded: bool, sep: str = " ") -> str:
    """A table cell's or plot label's text, marked when measured under load."""
    return f"{label}{sep}({MARK})" if is_loaded else label


def describe(summary: Mapping[str, Any] | None, threshold: float = DEFAULT_THRESHOLD) -> str:
    """The load in words, for a headline: 'measured at load 1.9 (1-min average), other processes
    0.05 cores, 0 % steal; no run under load'."""
    s = summary or {}
    if not s.get("runs_judged"):
        return "load not recorded (no /proc/stat)" if s.get("runs") else "load not recorded"
    parts = [f"measured at load {s['loadavg']:.1f} (1-min average)" if s.get("loadavg") is not None
             else "measured at an unknown load average"]
    if s.get("others_cores") is not None:
        parts.append(f"other processes {s['others_cores']:.2f} cores")
    if s.get("steal_pct") is not None:
        parts.append(f"{s['steal_pct']:.0f} % steal")
    n, bad = int(s.get("runs") or 0), int(s.get("runs_under_load") or 0)
    verdict = ("no run under load" if not bad else
               f"{bad} of {plural(n, 'run')} under load (other processes over {threshold:g} cores)")
    return ", ".join(parts) + "; " + verdict
