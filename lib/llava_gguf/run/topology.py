"""The CPUs of a Linux machine: which ones this process may use, grouped into big / medium / little
clusters, and the core sets that tune tries (each with its llama.cpp `-t/-C/--cpu-strict` options).

Everything is read below a root folder (default "/"), so tests point it at fake sysfs/procfs trees:
per CPU `sys/devices/system/cpu/cpuN/cpu_capacity`, `cpufreq/cpuinfo_max_freq` and
`topology/cluster_cpus_list`, the online list `sys/devices/system/cpu/online`, and /proc/cpuinfo.

Clusters here are performance classes, not sysfs's `cluster_cpus`: on the boards this project
targets that file does not follow the core types. Radxa's O6 kernel puts all 12 cores in one
cluster, the RK3588 splits its four A76 cores into two clusters of two, and x86 kernels give each
CPU a cluster of its own. So CPUs are ranked by `cpu_capacity` (the scheduler's relative speed), then
by maximum frequency, and neighbours in that order within SAME_CLASS of each other share a cluster.
The sysfs clusters are reported inside each class. Where nothing ranks the CPUs, they form one
cluster "all" and the reason is logged and kept in `Topology.notes`: no speed is ever guessed.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Arm Ltd (implementer 0x41) core part numbers: aarch64 /proc/cpuinfo has no model name.
ARM_PARTS = {
    0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72",
    0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76", 0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77",
    0xd40: "Neoverse-V1", 0xd41: "Cortex-A78", 0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710",
    0xd48: "Cortex-X2", 0xd49: "Neoverse-N2", 0xd4a: "Neoverse-E1", 0xd4b: "Cortex-A78C", 0xd4d: "Cortex-A715",
    0xd4e: "Cortex-X3", 0xd4f: "Neoverse-V2", 0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4",
    0xd84: "Neoverse-V3", 0xd85: "Cortex-X925", 0xd87: "Cortex-A725", 0xd8e: "Neoverse-N3",
}
ARM_IMPLEMENTERS = {0x41: "Arm", 0x48: "HiSilicon", 0x51: "Qualcomm", 0x61: "Apple", 0xc0: "Ampere"}

# Neighbours (in speed order) closer than this share a cluster. Cores of one type are often binned
# a few percent apart: the O6's A720 pairs run at 2600/2500 and 2300/2200 MHz, AMD's preferred
# cores boost ~2-4 % above the rest. Real clusters differ by far more (A720 2500 vs 2300: 8 %).
SAME_CLASS = 0.05
CLUSTER_NAMES = {1: ["all"], 2: ["big", "little"], 3: ["big", "medium", "little"]}
# llama.cpp's parse_cpu_mask reads at most 128 hex digits (GGML_MAX_N_THREADS = 512 CPUs).
MAX_MASK_CPUS = 512
# sysfs files naming a CPU's cluster, best first; x86 kernels before 5.16 lack cluster_cpus*.
CLUSTER_FILES = ("cluster_cpus_list", "cluster_cpus", "core_siblings_list", "package_cpus_list")


class TopologyError(RuntimeError):
    """No CPU could be found below the root."""


# ----------------------------------------------------------------------------- /proc/cpuinfo
def cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per blank-line separated block, keys lower-cased."""
    blocks = []
    for block in re.split(r"\n\s*\n", text):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def core_name(fields: dict[str, str]) -> str | None:
    """A processor block's core: x86 'model name', else the Arm implementer/part pair."""
    if fields.get("model name"):
        return fields["model name"]
    try:
        implementer = int(fields["cpu implementer"], 16)
        part = int(fields["cpu part"], 16)
    except (KeyError, ValueError):
        return None
    if implementer == 0x41 and part in ARM_PARTS:
        return ARM_PARTS[part]
    return f"{ARM_IMPLEMENTERS.get(implementer, hex(implementer))} part {hex(part)}"


def core_types_by_cpu(text: str) -> dict[int, str | None]:
    return {int(b["processor"]): core_name(b) for b in cpuinfo_blocks(text) if b.get("processor", "").isdigit()}


# ----------------------------------------------------------------------------- CPU lists
def parse_cpu_list(text: str) -> list[int]:
    """Kernel CPU list syntax: '0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cpus)


def parse_sysfs_mask(text: str) -> list[int]:
    """A sysfs hex CPU mask ('00000000,0000000f': 32-bit words, most significant first)."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def format_cpu_list(cpus) -> str:
    """[0, 9, 10, 11] -> '0,9-11' (the kernel's and taskset's syntax)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def cpu_mask(cpus) -> str:
    """llama.cpp's `-C/--cpu-mask` value: hex, CPU 0 in the lowest bit, most significant digit first.

    common.cpp's parse_cpu_mask takes an optional lower-case '0x' prefix and at most 128 digits.
    """
    cpus = sorted(set(cpus))
    if not cpus or cpus[0] < 0 or cpus[-1] >= MAX_MASK_CPUS:
        raise ValueError(f"CPU mask needs CPUs 0..{MAX_MASK_CPUS - 1}, got {cpus}")
    return hex(sum(1 << c for c in cpus))


# ----------------------------------------------------------------------------- reading sysfs
@dataclass(frozen=True)
class Cpu:
    id: int
    capacity: int | None          # cpu_capacity: 1024 = the fastest CPU of the machine
    max_mhz: int | None           # cpufreq/cpuinfo_max_freq / 1000
    core_type: str | None         # /proc/cpuinfo model name or Arm part
    sysfs_cluster: tuple[int, ...] | None


@dataclass(frozen=True)
class Cluster:
    """CPUs of one speed class, fastest class first: label, CPUs, core type(s), capacity, max MHz."""

    label: str
    cpus: tuple[int, ...]
    core_type: str | None
    capacity: tuple[int, ...]     # distinct values, highest first (empty: not known)
    max_mhz: tuple[int, ...]
    sysfs_clusters: tuple[tuple[int, ...], ...]

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu_list": format_cpu_list(self.cpus), "capacity": list(self.capacity),
                "max_mhz": list(self.max_mhz), "cpus": list(self.cpus),
                "sysfs_clusters": [list(c) for c in self.sysfs_clusters]}


@dataclass(frozen=True)
class Topology:
    online: tuple[int, ...]
    cpus: tuple[Cpu, ...]         # the usable ones: online and in the process's affinity
    clusters: tuple[Cluster, ...]
    ranked_by: tuple[str, ...]    # ("cpu_capacity", "cpuinfo_max_freq"), a subset, or ()
    notes: tuple[str, ...]        # why the CPUs are not (fully) ranked

    @property
    def usable(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.cpus)

    def as_dict(self) -> dict:
        return {"online": list(self.online), "usable": list(self.usable), "ranked_by": list(self.ranked_by),
                "clusters": [c.as_dict() for c in self.clusters], "notes": list(self.notes)}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text and text.isdigit() else None


def _sysfs_cluster(topo_dir: Path) -> tuple[int, ...] | None:
    for name in CLUSTER_FILES:
        text = _read(topo_dir / name)
        if text:
            return tuple(parse_sysfs_mask(text) if name == "cluster_cpus" else parse_cpu_list(text))
    return None


def _online(root: Path, notes: list[str]) -> list[int]:
    cpu_dir = root / "sys/devices/system/cpu"
    text = _read(cpu_dir / "online")
    if text:
        return parse_cpu_list(text)
    listed = sorted(int(p.name[3:]) for p in cpu_dir.glob("cpu[0-9]*") if p.name[3:].isdigit())
    if not listed:
        listed = sorted(core_types_by_cpu(_read(root / "proc/cpuinfo") or ""))
    if not listed and root == Path("/"):  # no /sys or /proc (not Linux): the CPUs Python counts
        listed = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else list(range(os.cpu_count() or 1)))
    notes.append(f"no {cpu_dir / 'online'}: every CPU listed taken as online")
    return listed


def _usable(root: Path, affinity: set[int] | None, notes: list[str]) -> tuple[list[int], list[int]]:
    """(online CPUs, those this process may use) below `root`."""
    online = _online(root, notes)
    if affinity is None and root == Path("/") and hasattr(os, "sched_getaffinity"):
        affinity = set(os.sched_getaffinity(0))
    usable = [c for c in online if affinity is None or c in affinity]
    if not usable:
        raise TopologyError(f"no usable CPU below {root} (online {format_cpu_list(online) or 'none'}, "
                            f"affinity {format_cpu_list(affinity or [])}); is it a Linux root with /sys and /proc?")
    return online, usable


def usable_cores() -> int:
    """The CPUs this process may run on: online and in its affinity (a container's or taskset's limit).
    The one core count: thread and job defaults everywhere come from it."""
    return len(_usable(Path("/"), None, [])[1])


def read_topology(root: str | Path = "/", affinity: set[int] | None = None) -> Topology:
    """The usable CPUs below `root`, ranked into clusters.

    `affinity`: the CPUs this process may run on; None reads the process's own when `root` is "/"
    (a taskset or container limit) and means no limit for any other root.
    """
    root = Path(root)
    notes: list[str] = []
    online, usable = _usable(root, affinity, notes)
    types = core_types_by_cpu(_read(root / "proc/cpuinfo") or "")
    cpu_dir = root / "sys/devices/system/cpu"
    cpus = tuple(Cpu(c, _read_int(cpu_dir / f"cpu{c}/cpu_capacity"),
                     (khz // 1000) if (khz := _read_int(cpu_dir / f"cpu{c}/cpufreq/cpuinfo_max_freq")) else None,
                     types.get(c), _sysfs_cluster(cpu_dir / f"cpu{c}/topology")) for c in usable)
    clusters, ranked_by = _rank(cpus, notes)
    for note in notes:
        log.info("CPU topology (%s): %s", root, note)
    return Topology(tuple(online), cpus, tuple(clusters), ranked_by, tuple(notes))


# ----------------------------------------------------------------------------- clusters
def _close(a: int, b: int) -> bool:
    return abs(a - b) <= SAME_CLASS * max(a, b)


def _rank(cpus: tuple[Cpu, ...], notes: list[str]) -> tuple[list[Cluster], tuple[str, ...]]:
    measures = []
    for name, get in (("cpu_capacity", lambda c: c.capacity), ("cpuinfo_max_freq", lambda c: c.max_mhz)):
        missing = [c.id for c in cpus if get(c) is None]
        if missing:
            notes.append(f"no {name} for CPUs {format_cpu_list(missing)}: not ranked by it")
        else:
            measures.append((name, get))
    if not measures:
        groups = [list(cpus)]
    else:
        order = sorted(cpus, key=lambda c: tuple(-get(c) for _, get in measures) + (c.id,))
        groups = [[order[0]]]
        for prev, cpu in zip(order, order[1:]):
            if all(_close(get(prev), get(cpu)) for _, get in measures):
                groups[-1].append(cpu)
            else:
                groups.append([cpu])
    if len(groups) == 1 and len({c.core_type for c in cpus}) > 1:
        notes.append("core types differ but neither cpu_capacity nor cpuinfo_max_freq tells them apart: "
                     "one cluster of all usable CPUs")
    if len(groups) > 3:
        notes.append(f"{len(groups)} speed classes: the slowest {len(groups) - 2} form 'little'")
        groups = groups[:2] + [[c for g in groups[2:] for c in g]]
    names = CLUSTER_NAMES[len(groups)]
    return [_cluster(name, group) for name, group in zip(names, groups)], tuple(n for n, _ in measures)


def _cluster(label: str, cpus: list[Cpu]) -> Cluster:
    counted = Counter(c.core_type for c in cpus if c.core_type)
    core_type = (" + ".join(f"{n}x {t}" if len(counted) > 1 else t for t, n in counted.items()) or None)
    ids = {c.id for c in cpus}
    sysfs = sorted({tuple(x for x in c.sysfs_cluster if x in ids) for c in cpus if c.sysfs_cluster})
    return Cluster(label, tuple(sorted(ids)), core_type,
                   tuple(sorted({c.capacity for c in cpus if c.capacity is not None}, reverse=True)),
                   tuple(sorted({c.max_mhz for c in cpus if c.max_mhz is not None}, reverse=True)),
                   tuple(sysfs))


# ----------------------------------------------------------------------------- core sets for tune
@dataclass(frozen=True)
class CoreSet:
    """One core set tune tries: one thread per CPU, placed on exactly these CPUs."""

    label: str                    # "big", "big+medium" or "all"
    cpus: tuple[int, ...]
    cpu_strict: bool              # pin thread i to one CPU (only when the set excludes usable CPUs)

    @property
    def threads(self) -> int:
        return len(self.cpus)

    @property
    def cpu_mask(self) -> str:
        return cpu_mask(self.cpus)

    def as_dict(self) -> dict:
        return {"label": self.label, "cpus": list(self.cpus), "cpu_list": format_cpu_list(self.cpus),
                "threads": self.threads, "cpu_mask": self.cpu_mask, "cpu_strict": self.cpu_strict}


def core_sets(topology: Topology) -> list[CoreSet]:
    """'big', 'big+medium', 'all', without repeats: one cluster gives one set, two give big and all."""
    usable = tuple(sorted(topology.usable))
    out: list[CoreSet] = []
    for label, n in (("big", 1), ("big+medium", 2)):
        cpus = tuple(sorted(c for cl in topology.clusters[:n] for c in cl.cpus))
        if len(topology.clusters) > n and cpus not in {s.cpus for s in out}:
            out.append(CoreSet(label, cpus, cpu_strict=True))
    return out + [CoreSet("all", usable, cpu_strict=False)]


def llama_options(core_set: CoreSet) -> dict[str, str]:
    """The core set as llama.cpp options (long names -> values), in command-line order.

    Every option is given for the batch pool too: common.cpp's postprocess_cpu_params copies the
    generation pool's mask and strictness to the batch pool only when `-tb` is absent, so `-tb N`
    alone would leave prompt processing unpinned. The set "all" gives threads only: a mask of every
    usable CPU is the tool's default placement.
    """
    n = str(core_set.threads)
    opts = {"--threads": n, "--threads-batch": n}
    if core_set.cpu_strict:
        mask = core_set.cpu_mask
        opts.update({"--cpu-mask": mask, "--cpu-mask-batch": mask, "--cpu-strict": "1", "--cpu-strict-batch": "1"})
    return opts


def llama_argv(core_set: CoreSet) -> list[str]:
    """llama_options flattened: ['--threads', '4', '--threads-batch', '4', '--cpu-mask', '0xf0', ...]."""
    return [x for kv in llama_options(core_set).items() for x in kv]
