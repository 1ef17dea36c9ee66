"""What llama.cpp repacked, read from load logs (tests/data/logs/README.md says which are recorded),
and checked against what the repack rules expect of the CPU that ran."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llava_gguf.tune import quant_candidates
from llava_gguf.llama_cpp import repack_log

LOGS = Path(__file__).parent / "data" / "logs"


def _log(name: str) -> repack_log.RepackLog:
    return repack_log.parse_repack_file(LOGS / name)


def test_x86_q4_0_is_repacked_and_the_debug_lines_name_each_matrix():
    got = _log("mtmd-cli-0c1e570-x86-Q4_0-v.log")
    assert len(got.loads) == 2 and got.loads[0].dry_run and not got.final.dry_run  # common_fit, then the load
    assert got.repacked is True
    s = got.summary()
    assert s["repack_MiB"] == 0.70 and s["other_weights_MiB"] == 11.44
    assert s["layouts"] == "q4_0_8x8 x14" and s["not_repacked_tensors"] == 7  # token_embd, output (q6_K), 5 norms
    assert s["quant"] == "Q4_0" and got.final.tensor_types == {"f32": 5, "q4_0": 15, "q6_K": 1}
    assert got.final.repacked["blk.1.ffn_up.weight"] == "q4_0_8x8" and "output.weight" not in got.final.repacked


def test_x86_q5_k_m_at_evaluates_verbosity_is_not_repacked():
    got = _log("mtmd-cli-0c1e570-x86-Q5_K_M-lv4.log")
    assert got.repacked is False and got.summary()["repack_MiB"] == 0.0
    assert got.final.buffers == {"CPU_Mapped": 12.67} and got.summary()["quant"] == "Q5_K_M"


def test_x86_q4_k_m_in_llama_bench_repacks_its_q4_k_only():
    got = _log("bench-0c1e570-x86-Q4_K_M-v.log")
    assert got.repacked is True and got.final.repacked_types() == ["q4_K"]
    # Q4_K_M's heavier attn_v and ffn_down (q6_K in the 2-layer model's last layer) stay as they are.
    assert {"blk.1.attn_v.weight", "blk.1.ffn_down.weight"}.isdisjoint(got.final.repacked)
    assert len(got.final.repacked) == 12 and got.final.tensor_types["q6_K"] == 3


def test_a_log_without_loader_lines_cannot_say():
    got = _log("perplexity-0c1e570-x86-system-info.log")
    assert got.loads == [] and got.repacked is None and got.summary()["repack_MiB"] is None


def test_f16_logs_recorded_before_are_not_repacked():
    assert _log("mtmd-cli-0c1e570-v-perf.log").repacked is False
    assert _log("mtmd-cli-0c1e570-lv4.log").repacked is False
    assert _log("mtmd-cli-0c1e570-default.log").repacked is None  # default verbosity shows no loader lines


def test_arm_excerpt_from_the_sources_format_strings():
    """Not recorded: the pinned source's messages with the layouts the rules give an i8mm CPU."""
    text = (LOGS / "arm-i8mm-Q4_0-from-source-format.log").read_text()
    got = repack_log.parse_repack_log(text)
    assert got.repacked is True and got.summary()["repack_MiB"] == 7.11
    assert got.final.layouts() == {"q4_0_4x8": 14, "q6_K_8x8": 1}
    cpu = quant_candidates.from_system_info(text)
    expected = cpu.repacked_ggml_types()
    assert {expected[t] for t in got.final.repacked_types()} == set(got.final.layouts())


def test_old_buffer_name_and_a_dry_run_only_log():
    old = repack_log.parse_repack_log("llm_load_tensors:  CPU_AARCH64 model buffer size =   100.00 MiB\n"
                                      "llm_load_tensors:   CPU_Mapped model buffer size =  4000.00 MiB\n")
    assert old.repacked is True and old.summary()["repack_MiB"] == 100.0
    dry = repack_log.parse_repack_log("load_tensors:          CPU model buffer size =     0.00 MiB\n"
                                      "load_tensors:   CPU_REPACK model buffer size =     0.00 MiB\n")
    assert dry.final.dry_run and dry.repacked is True


def test_this_machine_repacks_what_the_rules_expect(tmp_path, tiny_ggufs, llama_tool):
    """llama-bench -v on tiny Q4_0 and Q5_K_M files: the log's verdict is the rules' for this CPU."""
    quantize, bench = llama_tool("llama-quantize"), llama_tool("llama-bench")
    expected = quant_candidates.this_cpu().repacked_ggml_types()
    for qtype, main in (("Q4_0", "q4_0"), ("Q5_K_M", "q5_K")):
        out = tmp_path / f"tiny-{qtype}.gguf"
        subprocess.run([quantize, tiny_ggufs["text"], out, qtype, "2"], check=True, capture_output=True, timeout=300)
        run = subprocess.run([bench, "-m", out, "-p", "8", "-n", "0", "-r", "1", "-t", "2", "-v"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        got = repack_log.parse_repack_log(run.stdout + run.stderr)
        assert got.repacked is (main in expected), (qtype, got.summary(), expected)
        if main in expected:
            assert got.final.layouts().get(expected[main]), got.summary()


CPU = Path(__file__).parent / "data" / "cpu"


def _cpu(name: str, sve_bytes: int | None = None) -> quant_candidates.CpuFeatures:
    return quant_candidates.from_cpuinfo((CPU / name).read_text(), sve_bytes)


@pytest.mark.parametrize("log_name, cpu, expected", [
    # x86: AVX-512 VNNI build; Q4_0's and Q4_K's rules are AVX2's (q*_8x8), Q5_K has none.
    ("bench-0c1e570-x86-Q4_0-jsonl-v.log", ("epyc-avx512-vnni.cpuinfo", None), {"q4_0_8x8": 14}),
    ("bench-0c1e570-x86-Q5_K_M-jsonl-v.log", ("epyc-avx512-vnni.cpuinfo", None), {}),
    ("bench-0c1e570-x86-Q4_K_M-v.log", ("ryzen7-1700-avx2.cpuinfo", None), {"q4_K_8x8": 12}),
    # x86 with AMX (a Xeon VM, 2026-12-08, patch 0005): the AMX buffer takes the q4_K and q6_K matrices first.
    ("bench-0c1e570-x86-amx-Q4_K_M-jsonl-v.log", ("xeon-amx.cpuinfo", None), {"q4_K_amx": 12, "q6_K_amx": 3}),
    # Arm i8mm (the O6's cross build under qemu-user, 128-bit SVE): Q4_0 takes the NEON 4x8 path, and
    # the heavier q6_K matrices are repacked too.
    ("bench-0c1e570-arm64-i8mm-qemu-Q4_0-jsonl-v.log", ("cix-p1-i8mm.cpuinfo", 16), {"q4_0_4x8": 14, "q6_K_8x8": 1}),
    ("bench-0c1e570-arm64-i8mm-qemu-Q5_K_M-jsonl-v.log", ("cix-p1-i8mm.cpuinfo", 16), {"q5_K_8x8": 12, "q6_K_8x8": 3}),
    # Arm with dotprod only (a cross build for armv8.2-a+dotprod, the RK3588's A76): the 4x4 and 8x4 layouts.
    ("bench-0c1e570-arm64-dotprod-qemu-Q4_0-jsonl-v.log", ("rk3588-rock5b-dotprod.cpuinfo", None),
     {"q4_0_4x4": 14, "q6_K_8x4": 1}),
    ("bench-0c1e570-arm64-dotprod-qemu-Q5_K_M-jsonl-v.log", ("rk3588-rock5b-dotprod.cpuinfo", None),
     {"q5_K_8x4": 12, "q6_K_8x4": 3}),
    ("bench-0c1e570-arm64-dotprod-qemu-IQ4_NL-jsonl-v.log", ("rk3588-rock5b-dotprod.cpuinfo", None),
     {"iq4_nl_4x4": 14, "q6_K_8x4": 1}),
])
def test_recorded_bench_loads_repack_what_the_rules_give_their_cpu(log_name, cpu, expected):
    got = _log(log_name)
    assert got.repacked is bool(expected)
    assert got.final.layouts() == expected
    rules = _cpu(*cpu).repacked_ggml_types()
    # Every layout the log names is the rules' layout for that ggml type on that CPU, and every ggml
    # type of the file the rules repack was repacked.
    assert {rules[t] for t in got.final.repacked_types()} == set(expected)
    in_file = {t for t, n in got.final.tensor_types.items() if n}
    matrices = in_file - {"f32"}
    assert {t for t in matrices if t in rules} == set(got.final.repacked_types())
