"""The llama.cpp file types the project makes and reads, and which of their tensors llama.cpp repacks.

Two data tables, the one definition of each concept (pure data and lookups: no tools, no files):

* `QUANT_TYPES`: per file type (the name llama-quantize takes and `general.file_type` carries) its
  bits per weight at 7B, the ggml tensor type most of its matrices get and the heavier types
  llama-quantize gives some tensors of a Llama (`llama_tensor_get_type_impl`, src/llama-quant.cpp).
* `REPACK_RULES`: at load time, the CPU backend of the pinned llama.cpp (0c1e570) moves each weight
  matrix of certain ggml types into the `CPU_REPACK` buffer, interleaved for its GEMM kernels
  (`ggml_repack_get_optimal_repack_type`, ggml/src/ggml-cpu/repack.cpp). The rules are kept in the
  source's order: the first whose features the build has and whose row multiple the matrix meets
  wins, later ones are fall-backs.

Features are spelled as llama.cpp's `system_info:` line spells them (AVX2, AVX512, NEON,
MATMUL_INT8, DOTPROD, SVE, VXE, RISCV_V). In the pinned source all but the SVE and RVV vector
lengths are compile-time (`ggml_cpu_has_*` test `__AVX2__`, `__ARM_FEATURE_MATMUL_INT8`, ...), so
they describe the build: a native build (`GGML_NATIVE`, the project's) has what the CPU has.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Measured 7B files run up to ~0.05 bit above the figures below (Q4_0: 4.54); disk checks add this.
SIZE_MARGIN_BPW = 0.1


@dataclass(frozen=True)
class QuantType:
    name: str  # llama-quantize's argument and the `general.file_type` name (LlamaFileType without MOSTLY_)
    bpw: float  # bits per weight of a 7B Llama's file in this type (sources above _TABLE)
    main: str  # the ggml type most matrices get (llama_ftype_get_default_type), ggml_type_name spelling
    # Heavier ggml types llama-quantize gives some matrices of a Llama (n_gqa 1, no experts, no imatrix):
    # type -> which tensors. token_embd keeps `main` unless listed; it is never repacked (GET_ROWS).
    others: dict[str, str] = field(default_factory=dict)
    loader: str = ""  # how the model loader names it (`print_info: file type = ...`); "": as `name`

    def __post_init__(self):
        if not self.loader:
            object.__setattr__(self, "loader", self.name)

    @property
    def ggml_types(self) -> tuple[str, ...]:
        return (self.main, *self.others)


# bpw: TheBloke's Llama-2-7B GGUF files (size x 8 / 6.74e9 parameters); IQ4_NL/IQ4_XS: llama-quantize's
# nominal figure (quantize.cpp QUANT_OPTIONS); the float types exactly.
_OUTPUT = "output.weight"
_MORE_BITS = "attn_v and ffn_down of the first and last eighth of the layers and every third between"
_TABLE = [
    QuantType("F32", 32.0, "f32", loader="all F32"),
    QuantType("F16", 16.0, "f16"),
    QuantType("BF16", 16.0, "bf16"),
    QuantType("Q8_0", 8.5, "q8_0"),
    QuantType("Q6_K", 6.56, "q6_K"),
    QuantType("Q5_1", 6.0, "q5_1", {"q6_K": _OUTPUT}),
    QuantType("Q5_K_M", 5.69, "q5_K", {"q6_K": f"{_OUTPUT}; {_MORE_BITS}"}, loader="Q5_K - Medium"),
    QuantType("Q5_K_S", 5.54, "q5_K", {"q6_K": _OUTPUT}, loader="Q5_K - Small"),
    QuantType("Q5_0", 5.5, "q5_0", {"q6_K": _OUTPUT}),
    QuantType("Q4_1", 5.0, "q4_1", {"q6_K": _OUTPUT}),
    QuantType("Q4_K_M", 4.89, "q4_K", {"q6_K": f"{_OUTPUT}; {_MORE_BITS}"}, loader="Q4_K - Medium"),
    QuantType("Q4_K_S", 4.58, "q4_K", {"q5_K": "attn_v of the first 4 layers, ffn_down of the first eighth",
                                       "q6_K": _OUTPUT}, loader="Q4_K - Small"),
    QuantType("IQ4_NL", 4.5, "iq4_nl", {"q5_K": "ffn_down of the first eighth (without imatrix)",
                                        "q6_K": _OUTPUT}, loader="IQ4_NL - 4.5 bpw"),
    QuantType("Q4_0", 4.5, "q4_0", {"q6_K": _OUTPUT}),
    QuantType("Q3_K_L", 4.27, "q3_K", {"q5_K": "attn_v, attn_output, ffn_down", "q6_K": _OUTPUT},
              loader="Q3_K - Large"),
    QuantType("IQ4_XS", 4.25, "iq4_xs", {"q5_K": "ffn_down of the first eighth (without imatrix)",
                                         "q6_K": _OUTPUT}, loader="IQ4_XS - 4.25 bpw"),
    QuantType("Q3_K_M", 3.91, "q3_K", {"q4_K": "attn_v (but the first 2), attn_output, most ffn_down",
                                       "q5_K": "attn_v of the first 2 layers, ffn_down of the first 16th",
                                       "q6_K": _OUTPUT}, loader="Q3_K - Medium"),
    QuantType("Q3_K_S", 3.5, "q3_K", {"q6_K": _OUTPUT}, loader="Q3_K - Small"),
    QuantType("Q2_K", 3.35, "q2_K", {"q3_K": "attn_v, attn_output, ffn_down", "q6_K": _OUTPUT},
              loader="Q2_K - Medium"),
]
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _TABLE}
# What the run parameters accept (F32 is only ever an export, never something to quantize to).
QUANTIZE_TYPES = tuple(n for n in QUANT_TYPES if n != "F32")
# The precisions the exports write (text: convert.outtype, mmproj: convert.mmproj_outtype).
TEXT_OUTTYPES = ("f16", "bf16", "f32", "q8_0")
MMPROJ_OUTTYPES = ("f16", "f32")


def get(name: str) -> QuantType | None:
    """The table row of a file type (any case), None for a name llama.cpp uses but the table lacks."""
    return QUANT_TYPES.get(str(name).upper())


def from_loader_name(text: str) -> QuantType | None:
    """The row for the model loader's file-type text ("Q4_K - Medium", "(guessed) Q4_0", ...)."""
    text = text.strip().removeprefix("(guessed) ")
    return next((q for q in QUANT_TYPES.values() if q.loader == text), None)


def bits_per_weight(name: str, default: float = 0.0) -> float:
    row = get(name)
    return row.bpw if row else default


def file_bits_per_weight(name: str, default: float = 16.0) -> float:
    """Bits per weight to size a file llama-quantize writes (the table's figure plus the margin)."""
    row = get(name)
    return row.bpw + SIZE_MARGIN_BPW if row else default


# ----------------------------------------------------------------------------- repacking
@dataclass(frozen=True)
class RepackRule:
    ggml_type: str  # ggml_type_name spelling: q4_0, q4_K, iq4_nl, ...
    layout: str  # what the `repack tensor` debug line names: <type>_<columns>x<interleave>
    # Alternatives, any of which suffices; each a set of system_info features all needed.
    needs: tuple[frozenset[str], ...]
    row_multiple: int  # ne[1] (the output rows) must be a multiple of this, else the next rule is tried
    sve_bytes: int | None = None  # with SVE in `needs`: ggml_cpu_get_sve_cnt() must equal this (QK8_0 = 32)
    rvv_bits: int | None = None  # with RISCV_V: the vector length; those kernels also need a zvfh build

    def matches(self, features: frozenset[str], sve_bytes: int | None = None, rvv_bits: int | None = None) -> bool:
        for need in self.needs:
            if not need <= features:
                continue
            if "SVE" in need and self.sve_bytes is not None and sve_bytes != self.sve_bytes:
                continue
            if "RISCV_V" in need and self.rvv_bits is not None and rvv_bits != self.rvv_bits:
                continue
            return True
        return False


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


_I8MM, _DOT = _f("NEON", "MATMUL_INT8"), _f("NEON", "DOTPROD")
REPACK_RULES: tuple[RepackRule, ...] = (
    # Q4_0's 8x8 path also runs on SVE with i8mm when the SVE vector is 256 bits (32 bytes); a 128-bit
    # SVE (Armv9 phone/board cores such as the O6's) falls through to the NEON 4x8 path.
    RepackRule("q4_0", "q4_0_8x8", (_f("AVX2"), _f("SVE", "MATMUL_INT8")), 8, sve_bytes=32),
    RepackRule("q4_0", "q4_0_4x8", (_I8MM,), 4),
    RepackRule("q4_0", "q4_0_4x4", (_DOT,), 4),
    RepackRule("q4_0", "q4_0_4x4", (_f("VXE"),), 4),
    RepackRule("q4_0", "q4_0_16x1", (_f("RISCV_V"),), 16, rvv_bits=256),
    RepackRule("q4_K", "q4_K_8x8", (_f("AVX2"),), 8),
    RepackRule("q4_K", "q4_K_8x8", (_I8MM,), 8),
    RepackRule("q4_K", "q4_K_8x4", (_DOT,), 8),
    RepackRule("q4_K", "q4_K_16x1", (_f("RISCV_V"),), 16, rvv_bits=256),
    # ggml_cpu_has_avx512() is __AVX512F__.
    RepackRule("q2_K", "q2_K_8x8", (_f("AVX512"),), 8),
    RepackRule("q2_K", "q2_K_16x1", (_f("RISCV_V"),), 16, rvv_bits=256),
    RepackRule("q5_K", "q5_K_8x8", (_I8MM,), 8),
    RepackRule("q5_K", "q5_K_8x4", (_DOT,), 8),
    RepackRule("q6_K", "q6_K_8x8", (_I8MM,), 8),
    RepackRule("q6_K", "q6_K_8x4", (_DOT,), 8),
    RepackRule("iq4_nl", "iq4_nl_8x8", (_f("AVX2"),), 8),
    RepackRule("iq4_nl", "iq4_nl_4x4", (_DOT,), 4),
    RepackRule("iq4_nl", "iq4_nl_16x1", (_f("RISCV_V"),), 16, rvv_bits=256),
    RepackRule("mxfp4", "mxfp4_8x8", (_f("AVX2"),), 8),
    RepackRule("mxfp4", "mxfp4_4x4", (_DOT,), 4),
    RepackRule("q8_0", "q8_0_4x8", (_I8MM,), 4),
    RepackRule("q8_0", "q8_0_4x4", (_DOT,), 4),
    RepackRule("q8_0", "q8_0_16x1", (_f("RISCV_V"),), 16, rvv_bits=256),
    RepackRule("q1_0", "q1_0_4x8", (_I8MM,), 4),
    RepackRule("q1_0", "q1_0_4x4", (_DOT,), 4),
)
# A build with AMX_INT8 and AVX512_VNNI (Xeon Sapphire Rapids and later) puts its `AMX` buffer before
# CPU_REPACK, so these types go there instead (ggml-cpu/amx/common.h qtype_has_amx_kernels); the AMD
# and Arm CPUs this project targets have no AMX.
AMX_TYPES = {"needs": frozenset({"AMX_INT8", "AVX512_VNNI"}),
             "types": ("q4_0", "q4_1", "q8_0", "q4_K", "q5_K", "q6_K", "iq4_xs")}
# The pinned source's revision these tables were read from.
SOURCE_COMMIT = "0c1e570"


def repack_layout(ggml_type: str, features, rows: int | None = None, sve_bytes: int | None = None,
                  rvv_bits: int | None = None) -> str | None:
    """The layout a matrix of `ggml_type` with `rows` output rows (ne[1]; None: any multiple of 16)
    is repacked into on a build with `features`, None when it stays as it is."""
    features = frozenset(features)
    for rule in REPACK_RULES:
        if rule.ggml_type.lower() != ggml_type.lower() or not rule.matches(features, sve_bytes, rvv_bits):
            continue
        if rows is None or rows % rule.row_multiple == 0:
            return rule.layout
    return None


def repacked_ggml_types(features, sve_bytes: int | None = None, rvv_bits: int | None = None) -> dict[str, str]:
    """ggml type -> layout, for every type a build with `features` repacks (matrices whose rows are a
    multiple of 16, as every matrix of LLaVA's 7B and of the tiny model is)."""
    out: dict[str, str] = {}
    for t in dict.fromkeys(r.ggml_type for r in REPACK_RULES):
        layout = repack_layout(t, features, None, sve_bytes, rvv_bits)
        if layout:
            out[t] = layout
    return out
