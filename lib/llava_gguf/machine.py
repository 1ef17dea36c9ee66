"""The machine a run measured on: CPU, cores, memory, OS, and the llama.cpp build that ran.

Speeds mean little without the board they were measured on, so step 06 writes
`outputs/<run>/machine.json` (artifact `machine`) and the comparison page and the model card read
it. Everything comes from what Linux exposes without privileges (/proc/cpuinfo, /proc/meminfo,
/sys, /etc/os-release) and from the llama.cpp tools themselves (`--version`, the `system_info:`
line their logs carry, the build's CMakeCache.txt), so it works the same on x86-64 and aarch64.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

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

_CMAKE_OPTION = re.compile(r"^([A-Z0-9_]+):(?:BOOL|STRING)=(.*)$")
# The build options that change what runs on a CPU board (CMakeCache also lists every backend's
# sub-options with their defaults, which would only bury these).
RELEVANT_CMAKE = re.compile(
    r"^(CMAKE_BUILD_TYPE|BUILD_SHARED_LIBS|GGML_(NATIVE|CPU|CPU_ARM_ARCH|CPU_KLEIDIAI|CPU_REPACK|CPU_ALL_VARIANTS"
    r"|AVX\w*|AMX\w*|F16C|FMA|BMI2|SSE42|OPENMP|LLAMAFILE|BLAS|BLAS_VENDOR|CUDA|HIP|METAL|VULKAN|OPENCL|SYCL"
    r"|RPC|CANN|MUSA|WEBGPU))$")


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------- CPU
def parse_cpuinfo(text: str) -> dict:
    """Model, per-core-type counts and flags from /proc/cpuinfo text (x86-64 or aarch64)."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    flags, models = set(), []
    hardware = None
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if "hardware" in fields:  # 32-bit Arm kernels put the SoC in a trailing block
            hardware = fields["hardware"]
        if "processor" not in fields or not fields["processor"].isdigit():
            continue
        flags |= set((fields.get("flags") or fields.get("features") or "").split())
        models.append(fields.get("model name") or _arm_core_name(fields))
    counted = Counter(m for m in models if m)
    return {
        "model": " + ".join(f"{n}x {m}" if len(counted) > 1 else m for m, n in counted.items()) or None,
        "core_types": dict(counted),
        "logical_cpus_listed": len(models),
        "hardware": hardware,
        "flags": sorted(flags),
        "features": sorted({name for flag, name in FEATURES_OF_INTEREST.items() if flag in flags}),
    }


def _arm_core_name(fields: dict) -> str | None:
    try:
        implementer = int(fields["cpu implementer"], 16)
        part = int(fields["cpu part"], 16)
    except (KeyError, ValueError):
        return None
    if implementer == 0x41 and part in ARM_PARTS:
        return ARM_PARTS[part]
    return f"{ARM_IMPLEMENTERS.get(implementer, hex(implementer))} part {hex(part)}"


def _max_freqs_mhz() -> list[int]:
    freqs = []
    for f in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq")):
        text = _read(f).strip()
        if text.isdigit():
            freqs.append(int(text) // 1000)
    return sorted(set(freqs))


def _board() -> str | None:
    """The board's name: the device tree model (Arm SBCs), else DMI vendor + product (ACPI/x86)."""
    dt = _read("/sys/firmware/devicetree/base/model").strip("\x00\n ")
    if dt:
        return dt
    vendor, product = (_read(f"/sys/class/dmi/id/{k}").strip() for k in ("sys_vendor", "product_name"))
    return " ".join(v for v in (vendor, product) if v) or None


def parse_meminfo(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+) kB", line)
        if m:
            values[m.group(1)] = int(m.group(2))
    return {"ram_mib": values["MemTotal"] // 1024 if "MemTotal" in values else None,
            "swap_mib": values["SwapTotal"] // 1024 if "SwapTotal" in values else None}


def _os_release() -> str | None:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', _read(path), re.M)
        if m:
            return m.group(1)
    return None


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def machine_info() -> dict:
    """The machine this process runs on (no host name, no serials: it may end up in a public card)."""
    cpu = _cpu_of_this_process()
    return {
        "board": None if cpu.get("emulated") else _board(),  # under emulation the host's DMI is no board
        "cpu": cpu["model"] or cpu["hardware"] or platform.processor() or None,
        "core_types": cpu["core_types"],
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "max_mhz": _max_freqs_mhz(),
        "features": cpu["features"],
        "flags": cpu["flags"],
        **parse_meminfo(_read("/proc/meminfo")),
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


def _system_info_from_logs(folder: Path) -> tuple[dict | None, str | None]:
    """The newest log under `folder` with a system_info line (llama-perplexity logs it at INFO)."""
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in logs:
        info = parse_system_info(_read(path))
        if info:
            return info, path.name
    return None, None


def cmake_options(bin_dir: Path) -> dict[str, str] | None:
    """The CPU-relevant options set (ON or a value) in the build's CMakeCache.txt, when it is found."""
    base = bin_dir.parent
    for cache in (base / "CMakeCache.txt", base / "cmake" / "CMakeCache.txt", base / "build" / "CMakeCache.txt",
                  base.parent / "CMakeCache.txt"):
        if cache.is_file():
            opts = {}
            for line in _read(cache).splitlines():
                m = _CMAKE_OPTION.match(line)
                if m and RELEVANT_CMAKE.match(m.group(1)) and m.group(2) not in ("", "OFF"):
                    opts[m.group(1)] = m.group(2)
            if opts.get("GGML_BLAS") != "ON":
                opts.pop("GGML_BLAS_VENDOR", None)
            return opts
    return None


def llama_cpp_build(configured: str | None = None, logs: Path | None = None) -> dict:
    """The llama.cpp build: tools folder, version, compiler and target, CMake options, system_info."""
    from .llama_cpp import toolchain

    try:
        tool = toolchain.find_tool("llama-mtmd-cli", configured)
    except toolchain.ToolNotFound as err:
        return {"error": str(err)}
    out: dict = {"bin_dir": str(tool.parent)}
    try:
        proc = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60)
        text = proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as err:
        text = ""
        out["version_error"] = str(err)
    for key, pattern in (("version", r"^version:\s*(.+)$"), ("built_with", r"^built with (.+)$")):
        m = re.search(pattern, text, re.M)
        out[key] = m.group(1).strip() if m else None
    out["cmake_options"] = cmake_options(tool.parent)
    if logs is not None:
        out["system_info"], out["system_info_log"] = _system_info_from_logs(logs)
    return out


# ----------------------------------------------------------------------------- the run
def record_machine(run: Run) -> Path:
    """Write outputs/<run>/machine.json (machine, llama.cpp build, the run's params); record `machine`.

    The params are copied in so a run folder alone (copied from a board) says which model it measured.
    """
    data = {
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "llama_cpp": llama_cpp_build(run.params.llama_cpp.dir, run.dir / "logs"),
        "params": run.params.model_dump(mode="json"),
    }
    path = write_json(run.dir / "machine.json", data)
    run.record("machine", path)
    log.info("machine: %s, %s cores, %s MiB RAM, %s; llama.cpp %s", data["machine"]["cpu"],
             data["machine"]["cores"], data["machine"]["ram_mib"], data["machine"]["os"],
             data["llama_cpp"].get("version"))
    return path


def describe(machine: dict) -> str:
    """One line: board, CPU, cores, RAM, OS (for tables and the model card)."""
    m = machine or {}
    parts = [m.get("board"), m.get("cpu"), f"{m['cores']} cores" if m.get("cores") else None,
             f"{m['ram_mib'] / 1024:.0f} GiB RAM" if m.get("ram_mib") else None, m.get("os"),
             f"Linux {m['kernel']}" if m.get("kernel") else None,
             f"emulated ({m['emulation']}): {EMULATION_NOTE}" if m.get("emulation") else None]
    return ", ".join(str(p) for p in parts if p) or "unknown machine"
