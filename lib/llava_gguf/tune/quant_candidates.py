"""Which quant types are worth timing on this CPU: the kernels, not the bits per weight, decide.

llama.cpp repacks some weight types at load time into the layouts its fast GEMM kernels read
(`quant_types.REPACK_RULES`), so a type's prefill speed depends on whether this CPU's build repacks
it. `quant_candidates` lists the file types tune should measure here, each tagged with whether it is
*expected* to be repacked; whether it was is read from the load log (`llama_cpp.repack_log`).

The CPU's features come from llama.cpp's own `system_info:` line (what the build compiled in,
`from_system_info`) or, before any tool ran, from /proc/cpuinfo (`from_cpuinfo`: what a native
build of this CPU compiles in). /proc/cpuinfo has no SVE vector length; Linux gives the default
one in /proc/sys/abi/sve_default_vector_length (`sve_vector_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..model.quant_types import AMX_TYPES, QUANT_TYPES, repacked_ggml_types
from ..run import machine
from .config import SEED_TYPE

# Always measured, repacked here or not: the 4-bit families, the seed's type and the two precise ones.
ALWAYS_CONSIDERED = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0")

# /proc/cpuinfo flag (x86 `flags`, aarch64 `Features`), or machine.FEATURES_OF_INTEREST's usual name,
# -> the system_info name of the ggml_cpu_has_* a native build turns on for it.
CPUINFO_TO_GGML = {
    "pni": "SSE3", "sse3": "SSE3", "ssse3": "SSSE3", "avx": "AVX", "avx_vnni": "AVX_VNNI", "avx2": "AVX2",
    "f16c": "F16C", "fma": "FMA", "bmi2": "BMI2", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "amx_int8": "AMX_INT8",
    "asimd": "NEON", "i8mm": "MATMUL_INT8", "asimddp": "DOTPROD", "dotprod": "DOTPROD", "sve": "SVE",
    "fphp": "FP16_VA", "fp16": "FP16_VA", "sme": "SME", "sme2": "SME2", "vxe": "VXE",
}
SVE_LENGTH_FILE = "/proc/sys/abi/sve_default_vector_length"


class FeatureError(ValueError):
    """The text given holds no CPU features llama.cpp's repack rules could use."""


@dataclass(frozen=True)
class CpuFeatures:
    features: frozenset[str]  # system_info spelling (AVX2, NEON, MATMUL_INT8, ...)
    sve_bytes: int | None = None  # SVE vector length in bytes (system_info's SVE_CNT); None: unknown/no SVE
    rvv_bits: int | None = None  # RISC-V vector length (system_info's RVV_VLEN)
    # system_info's REPACK = 1: built with GGML_CPU_REPACK. None: unknown (the default build has it).
    repack_built: bool | None = None
    source: str = "system_info"  # or "cpuinfo"

    def repacked_ggml_types(self) -> dict[str, str]:
        """ggml type -> layout for every type this build repacks (CPU_REPACK's none when built without
        it; `<type>_amx` for the types an AMX build's buffer takes first)."""
        out = {} if self.repack_built is False else repacked_ggml_types(self.features, self.sve_bytes, self.rvv_bits)
        if AMX_TYPES["needs"] <= self.features:
            out.update({t: f"{t}_amx" for t in AMX_TYPES["types"]})
        return out


def from_system_info(text: str) -> CpuFeatures:
    """The CPU backend's features from a llama.cpp log (or just its `system_info:` line)."""
    info = machine.parse_system_info(text)
    cpu = (info or {}).get("backends", {}).get("CPU")
    if not cpu:
        raise FeatureError("no 'system_info: ... CPU : FEATURE = 1 | ...' line in the text; pass a log of "
                           "llama-cli, llama-perplexity or llama-imatrix, or /proc/cpuinfo to from_cpuinfo")
    on = frozenset(k for k, v in cpu.items() if v == "1")

    def _int(key: str) -> int | None:
        return int(cpu[key]) if str(cpu.get(key, "")).isdigit() else None

    return CpuFeatures(on, _int("SVE_CNT"), _int("RVV_VLEN"), "REPACK" in on, "system_info")


def from_cpuinfo(flags_or_text, sve_bytes: int | None = None) -> CpuFeatures:
    """The features a native build compiles in on this CPU: from /proc/cpuinfo text or its flags
    (machine.parse_cpuinfo()'s `flags` or `features`). `sve_bytes` is the SVE vector length."""
    if isinstance(flags_or_text, str):
        flags = machine.parse_cpuinfo(flags_or_text)["flags"]
    else:
        flags = list(flags_or_text)
    on = frozenset(CPUINFO_TO_GGML[f.lower()] for f in flags if f.lower() in CPUINFO_TO_GGML)
    if not on:
        raise FeatureError(f"none of the CPU flags {sorted(flags)[:12]}... is one llama.cpp's kernels test; "
                           "pass /proc/cpuinfo's text (x86-64 or aarch64) or its flags")
    return CpuFeatures(on, sve_bytes if "SVE" in on else None, None, None, "cpuinfo")


def sve_vector_bytes(path: str | Path = SVE_LENGTH_FILE) -> int | None:
    """This machine's default SVE vector length in bytes, None without SVE (or where Linux hides it)."""
    text = _read(path)
    return int(text) if text.isdigit() else None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def this_cpu() -> CpuFeatures:
    """This machine's CPU, from /proc/cpuinfo (before any llama.cpp tool ran)."""
    return from_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"), sve_vector_bytes())


@dataclass(frozen=True)
class Candidate:
    name: str  # the file type (llama-quantize's name)
    main: str  # the ggml type most of its matrices get
    repacked: bool  # expected: its main ggml type is repacked on this CPU
    layout: str | None  # the main type's repacked layout, e.g. q4_K_8x8
    repacked_types: tuple[str, ...]  # its ggml types (main and heavier ones) repacked here
    plain_types: tuple[str, ...]  # its ggml types that stay as they are
    why: str  # why it is a candidate

    def as_row(self) -> dict:
        return {"quant": self.name, "main_type": self.main, "repacked_expected": self.repacked,
                "layout": self.layout, "repacked_types": ", ".join(self.repacked_types),
                "plain_types": ", ".join(self.plain_types), "why": self.why}


def quant_candidates(cpu: CpuFeatures, always=ALWAYS_CONSIDERED, seed: str = SEED_TYPE) -> list[Candidate]:
    """The file types tune measures on `cpu`, most precise first: `always` (with `seed`), and every
    other quantized type whose main ggml type this CPU repacks (e.g. Q2_K with AVX-512, Q5_K_S on
    Arm with dotprod)."""
    layouts = cpu.repacked_ggml_types()
    always = list(dict.fromkeys([*always, seed]))
    unknown = [q for q in always if q.upper() not in QUANT_TYPES]
    if unknown:
        raise ValueError(f"unknown quant type(s) {unknown}; known: {', '.join(QUANT_TYPES)}")
    out = []
    for q in QUANT_TYPES.values():  # most precise first
        repacked = q.main in layouts
        if q.name == seed:
            why = "the seed's type"
        elif q.name in always:
            why = "always considered"
        elif repacked and q.main not in ("f32", "f16", "bf16"):
            why = f"its {q.main} matrices are repacked here"
        else:
            continue
        out.append(Candidate(q.name, q.main, repacked, layouts.get(q.main),
                             tuple(t for t in q.ggml_types if t in layouts),
                             tuple(t for t in q.ggml_types if t not in layouts), why))
    return out
