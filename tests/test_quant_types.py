"""The quant-type table, the repack rules and the tune candidates they give on four recorded CPUs
(tests/data/cpu/README.md says where each feature list comes from)."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest

from llava_gguf.model import quant_types
from llava_gguf.run import params
from llava_gguf.tune import quant_candidates
from llava_gguf.checks import quality
from llava_gguf.llama_cpp import toolchain
from llava_gguf.reports import plots

CPU = Path(__file__).parent / "data" / "cpu"


def _cpu(name: str, sve_bytes: int | None = None) -> quant_candidates.CpuFeatures:
    return quant_candidates.from_cpuinfo((CPU / name).read_text(), sve_bytes)


def _by_name(cands) -> dict[str, quant_candidates.Candidate]:
    return {c.name: c for c in cands}


# ----------------------------------------------------------------------------- the table
def test_every_file_type_is_one_llama_cpp_knows_and_its_ggml_types_are_ggml_types():
    ftypes = {t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in gguf.LlamaFileType}
    ggml = {t.name.lower() for t in gguf.GGMLQuantizationType}
    assert set(quant_types.QUANT_TYPES) <= ftypes
    for q in quant_types.QUANT_TYPES.values():
        assert {t.lower() for t in q.ggml_types} <= ggml, q
    assert {r.ggml_type.lower() for r in quant_types.REPACK_RULES} <= ggml


def test_the_table_is_ordered_by_precision_and_the_users_agree_with_it():
    bpw = [q.bpw for q in quant_types.QUANT_TYPES.values()]
    assert bpw == sorted(bpw, reverse=True)
    assert params.QuantizeParams(types=["q4_k_m", "IQ4_NL"]).types == ["Q4_K_M", "IQ4_NL"]
    with pytest.raises(ValueError, match="unknown quant type"):
        params.QuantizeParams(types=["F32"])  # an export type, never a quantization target
    assert quality.reference_variant(["Q4_0", "Q6_K", "Q5_K_M"]) == "Q6_K"
    assert plots.precision_order(["Q4_0", "mmproj", "F16", "Q8_0"]) == ["F16", "Q8_0", "Q4_0", "mmproj"]
    assert quant_types.file_bits_per_weight("Q4_0") > quant_types.bits_per_weight("Q4_0")
    assert quant_types.file_bits_per_weight("NOPE") == 16.0 and quant_types.get("nope") is None


def test_rules_follow_the_pinned_sources_order_of_layouts():
    """Every `return &<layout>_q8_<x>;` of ggml_repack_get_optimal_repack_type, per ggml type, in order."""
    assert quant_types.SOURCE_COMMIT == toolchain.LLAMA_CPP_COMMIT
    src = toolchain.cache_dir() / f"llama.cpp-{toolchain.LLAMA_CPP_COMMIT}-src" / "ggml/src/ggml-cpu/repack.cpp"
    if not src.exists():
        pytest.skip(f"{src} not extracted (make llama-cpp)")
    text = src.read_text()
    body = text[text.index("ggml_repack_get_optimal_repack_type(const struct ggml_tensor * cur) {"):]
    body = body[:body.index("\n}\n")]
    found: dict[str, list[str]] = {}
    for block in re.split(r"\bif \(cur->type == GGML_TYPE_|\} else if \(cur->type == GGML_TYPE_", body)[1:]:
        gtype = block[:block.index(")")]
        found[gtype.lower()] = re.findall(r"return &(\w+?)_q8_[0K];", block)
    ours: dict[str, list[str]] = {}
    for r in quant_types.REPACK_RULES:
        ours.setdefault(r.ggml_type.lower(), []).append(r.layout.lower())
    assert {k: [x.lower() for x in v] for k, v in found.items()} == ours


# ----------------------------------------------------------------------------- four CPUs
def test_x86_avx2_repacks_q4_0_q4_k_iq4_nl_and_tune_keeps_the_seven():
    cpu = _cpu("ryzen7-1700-avx2.cpuinfo")
    assert {"AVX2", "FMA", "F16C"} <= cpu.features and "AVX512" not in cpu.features
    assert cpu.repacked_ggml_types() == {"q4_0": "q4_0_8x8", "q4_K": "q4_K_8x8", "iq4_nl": "iq4_nl_8x8",
                                         "mxfp4": "mxfp4_8x8"}
    cands = _by_name(quant_candidates.quant_candidates(cpu))
    assert list(cands) == ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0"]
    assert {n for n, c in cands.items() if c.repacked} == {"Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0"}
    assert cands["Q5_K_M"].why == "the seed's type" and cands["Q5_K_M"].plain_types == ("q5_K", "q6_K")
    assert cands["Q4_K_M"].repacked_types == ("q4_K",) and cands["Q4_K_M"].plain_types == ("q6_K",)


def test_x86_avx512_vnni_adds_q2_k():
    cpu = _cpu("epyc-avx512-vnni.cpuinfo")
    assert {"AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX2"} <= cpu.features
    assert cpu.repacked_ggml_types()["q2_K"] == "q2_K_8x8"
    cands = _by_name(quant_candidates.quant_candidates(cpu))
    assert cands["Q2_K"].repacked and "repacked here" in cands["Q2_K"].why
    assert not cands["Q5_K_M"].repacked and cands["Q4_0"].layout == "q4_0_8x8"


def test_arm_i8mm_with_128_bit_sve_repacks_five_k_and_legacy_types():
    """The O6's SoC (CIX P1): Armv9.2 with i8mm, dotprod and SVE2 at 128 bits (16 bytes)."""
    cpu = _cpu("cix-p1-i8mm.cpuinfo", sve_bytes=16)
    assert {"NEON", "DOTPROD", "MATMUL_INT8", "SVE", "FP16_VA"} <= cpu.features and cpu.sve_bytes == 16
    # A 128-bit SVE misses Q4_0's 8x8 path (it needs 256 bits) and takes the NEON i8mm one.
    assert cpu.repacked_ggml_types() == {
        "q4_0": "q4_0_4x8", "q4_K": "q4_K_8x8", "q5_K": "q5_K_8x8", "q6_K": "q6_K_8x8", "iq4_nl": "iq4_nl_4x4",
        "mxfp4": "mxfp4_4x4", "q8_0": "q8_0_4x8", "q1_0": "q1_0_4x8"}
    cands = _by_name(quant_candidates.quant_candidates(cpu))
    assert list(cands) == ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0"]
    assert all(c.repacked for c in cands.values())
    assert cands["Q5_K_M"].plain_types == () and cands["Q5_K_S"].why == "its q5_K matrices are repacked here"
    # The same cores with a 256-bit SVE (or a system_info SVE_CNT of 32) take the 8x8 path.
    assert _cpu("cix-p1-i8mm.cpuinfo", sve_bytes=32).repacked_ggml_types()["q4_0"] == "q4_0_8x8"


def test_arm_dotprod_only_repacks_the_4x4_and_8x4_layouts():
    """RK3588 (Rock 5B): Cortex-A76 + A55, dotprod without i8mm."""
    cpu = _cpu("rk3588-rock5b-dotprod.cpuinfo")
    assert {"NEON", "DOTPROD"} <= cpu.features and "MATMUL_INT8" not in cpu.features
    assert cpu.repacked_ggml_types() == {
        "q4_0": "q4_0_4x4", "q4_K": "q4_K_8x4", "q5_K": "q5_K_8x4", "q6_K": "q6_K_8x4", "iq4_nl": "iq4_nl_4x4",
        "mxfp4": "mxfp4_4x4", "q8_0": "q8_0_4x4", "q1_0": "q1_0_4x4"}
    assert {c.name: c.layout for c in quant_candidates.quant_candidates(cpu)}["Q4_K_S"] == "q4_K_8x4"


def test_row_multiples_fall_through_as_the_source_does():
    i8mm = {"NEON", "DOTPROD", "MATMUL_INT8"}
    assert quant_types.repack_layout("q4_0", i8mm, rows=4) == "q4_0_4x8"
    assert quant_types.repack_layout("q4_K", i8mm, rows=12) is None  # neither 8x8 nor 8x4 fits 12 rows
    assert quant_types.repack_layout("q4_0", {"AVX2"}, rows=12) is None
    assert quant_types.repack_layout("Q4_0", {"SVE", "MATMUL_INT8", "NEON"}, rows=12, sve_bytes=32) == "q4_0_4x8"


# ----------------------------------------------------------------------------- system_info lines
# Built from the pinned source's format (common_params_get_system_info + ggml_backend_cpu_get_features),
# with the O6's features: not a recorded line.
O6_SYSTEM_INFO = ("system_info: n_threads = 12 / 12 | CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | "
                  "MATMUL_INT8 = 1 | SVE = 1 | DOTPROD = 1 | SVE_CNT = 16 | OPENMP = 1 | REPACK = 1 | ")


def test_system_info_line_gives_the_builds_features():
    cpu = quant_candidates.from_system_info("0.00.001 I " + O6_SYSTEM_INFO)
    assert cpu.sve_bytes == 16 and cpu.repack_built and cpu.source == "system_info"
    assert cpu.repacked_ggml_types() == _cpu("cix-p1-i8mm.cpuinfo", 16).repacked_ggml_types()
    unrepacked = quant_candidates.from_system_info(O6_SYSTEM_INFO.replace("REPACK = 1 | ", ""))
    assert unrepacked.repack_built is False and unrepacked.repacked_ggml_types() == {}
    assert not any(c.repacked for c in quant_candidates.quant_candidates(unrepacked))


def test_recorded_x86_system_info_agrees_with_cpuinfo():
    log = Path(__file__).parent / "data" / "logs" / "perplexity-0c1e570-x86-system-info.log"
    cpu = quant_candidates.from_system_info(log.read_text())
    assert {"AVX2", "AVX512", "AVX512_VNNI"} <= cpu.features and cpu.repack_built
    assert cpu.repacked_ggml_types() == _cpu("epyc-avx512-vnni.cpuinfo").repacked_ggml_types()


def test_unusable_feature_text_is_refused_with_the_fix():
    with pytest.raises(quant_candidates.FeatureError, match="system_info"):
        quant_candidates.from_system_info("llama_model_loader: loaded meta data")
    with pytest.raises(quant_candidates.FeatureError, match="/proc/cpuinfo"):
        quant_candidates.from_cpuinfo(["fpu", "vme"])
    with pytest.raises(ValueError, match="unknown quant type"):
        quant_candidates.quant_candidates(_cpu("rk3588-rock5b-dotprod.cpuinfo"), always=("Q4_X",))


def test_this_machine_is_read_without_error():
    cpu = quant_candidates.this_cpu()
    assert cpu.source == "cpuinfo" and cpu.features
    assert {"Q4_0", "Q5_K_M", "Q8_0"} <= {c.name for c in quant_candidates.quant_candidates(cpu)}


def test_an_amx_build_takes_its_types_before_cpu_repack():
    """Flags of an AMX-capable Xeon (a hand-picked subset, not a recorded list)."""
    cpu = quant_candidates.from_cpuinfo(["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"])
    got = cpu.repacked_ggml_types()
    assert (got["q4_K"], got["q6_K"]) == ("q4_K_amx", "q6_K_amx") and got["iq4_nl"] == "iq4_nl_8x8" and got["q2_K"] == "q2_K_8x8"


def test_loader_names_are_the_model_loaders_own():
    assert quant_types.from_loader_name("(guessed) Q4_K - Medium").name == "Q4_K_M"
    assert quant_types.from_loader_name("Q4_0").name == "Q4_0" and quant_types.from_loader_name("Q9") is None
    src = toolchain.cache_dir() / f"llama.cpp-{toolchain.LLAMA_CPP_COMMIT}-src" / "src/llama-model-loader.cpp"
    if not src.exists():
        pytest.skip(f"{src} not extracted (make llama-cpp)")
    names = set(re.findall(r'LLAMA_FTYPE_PREFIX "([^"]+)"', src.read_text()))
    assert {q.loader for q in quant_types.QUANT_TYPES.values()} <= names


# ----------------------------------------------------------------------------- what 07_tune measures
def test_tune_takes_the_cpus_candidates_and_the_runs_own_types():
    from llava_gguf.steps import tune_screen

    avx2 = tune_screen.candidate_types(None, _cpu("ryzen7-1700-avx2.cpuinfo"), extra=["Q5_K_S"])
    assert [s.quant for s in avx2] == ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0"]
    by = {s.quant: s for s in avx2}
    assert by["Q5_K_S"].why.startswith("made by step 05") and by["Q5_K_S"].repacked_expected is None
    assert by["IQ4_NL"].repacked_expected and by["IQ4_NL"].layout_expected == "iq4_nl_8x8"
    assert not by["Q6_K"].repacked_expected and by["Q5_K_M"].why == "the seed's type"
    i8mm = {s.quant: s for s in tune_screen.candidate_types(None, _cpu("cix-p1-i8mm.cpuinfo", 16))}
    assert {q for q, s in i8mm.items() if s.repacked_expected} == set(i8mm)  # every candidate repacked there
    assert i8mm["Q8_0"].layout_expected == "q8_0_4x8" and "Q5_K_S" in i8mm
    dot = {s.quant: s for s in tune_screen.candidate_types(None, _cpu("rk3588-rock5b-dotprod.cpuinfo"))}
    assert dot["Q6_K"].layout_expected == "q6_K_8x4" and dot["IQ4_NL"].layout_expected == "iq4_nl_4x4"
    # Types named in the params are those, in that order, whatever the CPU.
    named = tune_screen.candidate_types(["Q4_0", "Q5_K_M"], _cpu("ryzen7-1700-avx2.cpuinfo"), extra=["Q8_0"])
    assert [(s.quant, s.why) for s in named] == [("Q4_0", "named in tune.quant_types"),
                                                  ("Q5_K_M", "named in tune.quant_types")]
    assert named[0].repacked_expected is True
