"""The llama.cpp build a run used: its tools folder, version, compiler and target, CMake options and
the `system_info:` line its logs carry (what machine.json records beside the machine, step 06)."""
from __future__ import annotations

import re
from pathlib import Path

from . import toolchain
from .runner import ToolFailed
from ..run.machine import parse_system_info

_CMAKE_OPTION = re.compile(r"^([A-Z0-9_]+):(?:BOOL|STRING)=(.*)$")
# The build options that change what runs on a CPU board (CMakeCache also lists every backend's
# sub-options with their defaults, which would only bury these).
RELEVANT_CMAKE = re.compile(
    r"^(CMAKE_BUILD_TYPE|BUILD_SHARED_LIBS|GGML_(NATIVE|CPU|CPU_ARM_ARCH|CPU_KLEIDIAI|CPU_REPACK|CPU_ALL_VARIANTS"
    r"|AVX\w*|AMX\w*|F16C|FMA|BMI2|SSE42|OPENMP|LLAMAFILE|BLAS|BLAS_VENDOR|CUDA|HIP|METAL|VULKAN|OPENCL|SYCL"
    r"|RPC|CANN|MUSA|WEBGPU))$")


def system_info_from_logs(folder: Path) -> tuple[dict | None, str | None]:
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
    try:
        tool = toolchain.find_tool("llama-mtmd-cli", configured)
    except toolchain.ToolNotFound as err:
        return {"error": str(err)}
    out: dict = {"bin_dir": str(tool.parent)}
    try:
        text = toolchain.version_output(tool)
    except (OSError, ToolFailed) as err:
        text = ""
        out["version_error"] = str(err)
    for key, pattern in (("version", r"^version:\s*(.+)$"), ("built_with", r"^built with (.+)$")):
        m = re.search(pattern, text, re.M)
        out[key] = m.group(1).strip() if m else None
    out["cmake_options"] = cmake_options(tool.parent)
    if logs is not None:
        out["system_info"], out["system_info_log"] = system_info_from_logs(logs)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
