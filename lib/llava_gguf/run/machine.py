"""The machine a run measured on: CPU, cores and their clusters, memory, OS.

Speeds mean little without the board they were measured on, so step 06 writes
`outputs/<run>/machine.json` (artifact `machine`) and the comparison page and the model card read
it. Everything comes from what Linux exposes without privileges (/proc/cpuinfo, /sys,
/etc/os-release; memory from psutil; the CPU clusters from topology.py; a figure that cannot be
read is recorded as None with the reason, never guessed), so it works the same on x86-64 and
aarch64. machine.json holds, beside it, the llama.cpp build as llama_cpp/build_info.py reads it from
the tools themselves.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections import Counter
from pathlib import Path

import psutil

from . import topology
from .topology import usable_cores  # noqa: F401 (the one core count; machine.usable_cores for the reports)
from .workspace import Run, write_json

log = logging.getLogger(__name__)

# Set by whatever runs the workflow under emulation (`make arm64-rehearsal` sets "qemu-user"): the
# run's timings are the emulator's, and every report that shows the machine says so.
EMULATION_ENV = "LLAVA_GGUF_EMULATION"
EMULATION_NOTE = "timings are not board speed"

# CPU features that decide which llama.cpp kernels run; /proc/cpuinfo name -> the usual name.
# aarch64 spells dot product "asimddp" and half-precision arithmetic "fphp"/"asimdhp".
FEATURES_OF_INTEREST = {
    # aarch64
    "asimd": "asimd", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "bf16": "bf16",
    "fphp": "fp16", "asimdhp": "asimdhp", "sme": "sme", "sme2": "sme2", "svei8mm": "svei8mm",
    # x86-64
    "pni": "sse3", "ssse3": "ssse3", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx_vnni": "avx_vnni", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "avx512vbmi": "avx512vbmi",
    "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16",
}

def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------- CPU
def parse_cpuinfo(text: str) -> dict:
    """Model, per-core-type counts and flags from /proc/cpuinfo text (x86-64 or aarch64)."""
    flags, models = set(), []
    hardware = None
    for fields in topology.cpuinfo_blocks(text):
        if "hardware" in fields:  # 32-bit Arm kernels put the SoC in a trailing block
            hardware = fields["hardware"]
        if "processor" not in fields or not fields["processor"].isdigit():
            continue
        flags |= set((fields.get("flags") or fields.get("features") or "").split())
        models.append(topology.core_name(fields))
    counted = Counter(m for m in models if m)
    return {
        "model": " + ".join(f"{n}x {m}" if len(counted) > 1 else m for m, n in counted.items()) or None,
        "core_types": dict(counted),
        "logical_cpus_listed": len(models),
        "hardware": hardware,
        "flags": sorted(flags),
        "features": sorted({name for flag, name in FEATURES_OF_INTEREST.items() if flag in flags}),
    }


def _board() -> str | None:
    """The board's name: the device tree model (Arm SBCs), else DMI vendor + product (ACPI/x86)."""
    dt = _read("/sys/firmware/devicetree/base/model").strip("\x00\n ")
    if dt:
        return dt
    vendor, product = (_read(f"/sys/class/dmi/id/{k}").strip() for k in ("sys_vendor", "product_name"))
    return " ".join(v for v in (vendor, product) if v) or None


def memory() -> dict:
    """RAM and swap in MiB (psutil); None and `memory_error` where they cannot be read."""
    try:
        return {"ram_mib": psutil.virtual_memory().total // 2**20, "swap_mib": psutil.swap_memory().total // 2**20}
    except OSError as err:  # no /proc/meminfo, no sysinfo(2)
        return {"ram_mib": None, "swap_mib": None, "memory_error": f"{type(err).__name__}: {err}"}


def _os_release() -> str | None:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', _read(path), re.M)
        if m:
            return m.group(1)
    return None


# aarch64 AT_HWCAP / AT_HWCAP2 bits (Linux arch/arm64/include/uapi/asm/hwcap.h) -> /proc/cpuinfo names.
_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
_HWCAP2 = {1: "sve2", 9: "svei8mm", 13: "i8mm", 14: "bf16", 23: "sme"}


def hwcap_flags(auxv: bytes) -> set[str]:
    """The aarch64 features the kernel (or qemu-user) gives this process, from /proc/self/auxv bytes."""
    pairs = {int.from_bytes(auxv[i:i + 8], "little"): int.from_bytes(auxv[i + 8:i + 16], "little")
             for i in range(0, len(auxv) - 15, 16)}
    hwcap, hwcap2 = pairs.get(16, 0), pairs.get(26, 0)  # AT_HWCAP, AT_HWCAP2
    return ({name for bit, name in _HWCAP.items() if hwcap >> bit & 1}
            | {name for bit, name in _HWCAP2.items() if hwcap2 >> bit & 1})


def _cpu_of_this_process() -> dict:
    """parse_cpuinfo of /proc/cpuinfo, unless that describes another CPU than the one running us:
    under qemu-user /proc/cpuinfo is the host's (x86-64 flags seen by an aarch64 process), and the
    features are then the emulated CPU's hardware capabilities from the auxiliary vector."""
    cpu = parse_cpuinfo(_read("/proc/cpuinfo"))
    if platform.machine() == "aarch64" and (os.environ.get(EMULATION_ENV) or {"sse2", "pni"} & set(cpu["flags"])):
        try:
            flags = hwcap_flags(Path("/proc/self/auxv").read_bytes())
        except OSError:
            flags = set()
        emulator = os.environ.get(EMULATION_ENV) or "emulated"
        cpu = {**cpu, "model": f"{platform.machine()} ({emulator}, QEMU_CPU={os.environ.get('QEMU_CPU', 'default')})",
               "core_types": {}, "flags": sorted(flags), "emulated": True,
               "features": sorted({name for flag, name in FEATURES_OF_INTEREST.items() if flag in flags})}
    return cpu


def machine_info(board: str | None = None) -> dict:
    """The machine this process runs on (no host name, no serials: it may end up in a public card).

    `board` is the name the user gives it (params evaluate.board); else the device tree model or
    DMI product (not under emulation: the host's DMI is no board), else the CPU model."""
    cpu = _cpu_of_this_process()
    topo = topology.read_topology()
    cpu_model = cpu["model"] or cpu["hardware"] or platform.processor() or None
    return {
        "board": board or (None if cpu.get("emulated") else _board()) or cpu_model,
        "cpu": cpu_model,
        "core_types": cpu["core_types"],
        "cores": len(topo.online),
        "usable_cores": len(topo.usable),
        "max_mhz": sorted({c.max_mhz for c in topo.cpus if c.max_mhz}),
        "clusters": [c.as_dict() for c in topo.clusters],
        "clusters_ranked_by": list(topo.ranked_by),
        "topology_notes": list(topo.notes),
        "features": cpu["features"],
        "flags": cpu["flags"],
        **memory(),
        "os": _os_release() or platform.platform(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "emulation": os.environ.get(EMULATION_ENV) or None,
    }


# ----------------------------------------------------------------------------- llama.cpp
def parse_system_info(text: str) -> dict | None:
    """The first `system_info:` line of a llama.cpp log: threads and each backend's compiled features.

    e.g. 'system_info: n_threads = 2 / 2 | CPU : SSE3 = 1 | AVX2 = 1 | REPACK = 1 |'
    -> {'line': ..., 'n_threads': 2, 'hardware_concurrency': 2, 'backends': {'CPU': {'SSE3': '1', ...}}}
    """
    m = re.search(r"system_info: (.*)$", text, re.M)
    if not m:
        return None
    line = m.group(1).strip()
    out: dict = {"line": line, "backends": {}}
    t = re.match(r"n_threads = (\d+)(?: \(n_threads_batch = (\d+)\))? / (\d+)", line)
    if t:
        out["n_threads"] = int(t.group(1))
        out["hardware_concurrency"] = int(t.group(3))
    backend = None
    for part in (p.strip() for p in line.split("|")):
        b = re.match(r"^([\w-]+) : (\w[\w.]*) = (\S+)$", part)
        if b:
            backend, part = b.group(1), f"{b.group(2)} = {b.group(3)}"
            out["backends"].setdefault(backend, {})
        kv = re.match(r"^(\w[\w.]*) = (\S+)$", part)
        if kv and backend:
            out["backends"][backend][kv.group(1)] = kv.group(2)
    return out


# ----------------------------------------------------------------------------- the run
def record_machine(run: Run, llama_cpp: dict) -> Path:
    """Write outputs/<run>/machine.json (machine, the llama.cpp build as `llama_cpp.build_info` describes
    it, the run's params); record `machine`.

    The params are copied in so a run folder alone (copied from a board) says which model it measured.
    """
    data = {
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(run.params.evaluate.board),
        "llama_cpp": llama_cpp,
        "params": run.params.model_dump(mode="json"),
    }
    path = write_json(run.dir / "machine.json", data)
    run.record("machine", path)
    log.info("machine: %s, %s cores, %s MiB RAM, %s; llama.cpp %s", data["machine"]["cpu"],
             data["machine"]["cores"], data["machine"]["ram_mib"], data["machine"]["os"],
             data["llama_cpp"].get("version"))
    return path


def describe_clusters(machine: dict) -> str | None:
    """'big 0,9-11 (4x Cortex-A720, 2600-2500 MHz) / medium ... / little ...'; None for one cluster or none."""
    clusters = (machine or {}).get("clusters") or []
    if len(clusters) < 2:
        return None
    parts = []
    for c in clusters:
        mhz = c.get("max_mhz") or []
        detail = ", ".join(x for x in (
            f"{len(c['cpus'])}x {c['core_type']}" if c.get("core_type") else f"{len(c['cpus'])} CPUs",
            (f"{mhz[0]}-{mhz[-1]} MHz" if len(mhz) > 1 else f"{mhz[0]} MHz") if mhz else None) if x)
        parts.append(f"{c['label']} {c['cpu_list']} ({detail})")
    return " / ".join(parts)


def describe(machine: dict) -> str:
    """One line: board, CPU, cores (and their clusters), RAM, OS (for tables and the model card)."""
    m = machine or {}
    cores = f"{m['cores']} cores" if m.get("cores") else None
    if cores and m.get("usable_cores") and m["usable_cores"] != m["cores"]:
        cores += f" ({m['usable_cores']} usable)"
    clusters = describe_clusters(m)
    parts = [m.get("board"), m.get("cpu"), f"{cores}: {clusters}" if cores and clusters else cores,
             f"{m['ram_mib'] / 1024:.0f} GiB RAM" if m.get("ram_mib") else None, m.get("os"),
             f"Linux {m['kernel']}" if m.get("kernel") else None,
             f"emulated ({m['emulation']}): {EMULATION_NOTE}" if m.get("emulation") else None]
    return ", ".join(str(p) for p in parts if p) or "unknown machine"
