"""The run summary the arm64 rehearsal compares, and the comparison of the recorded ARM and x86 runs.

tests/data/rehearsal/{arm64,x86_64}.json are summaries of real runs of params/rehearsal.yaml: the
arm64 one from `make arm64-rehearsal RECORD=1` (qemu-user, 128-bit SVE with i8mm), the x86 one from
`make rehearsal-x86` on the development machine. The `*-run/` folders beside them hold the run
folders' files the summary reads, so the summary function is tested on what the runs wrote.
"""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from llava_gguf.run import workspace
from llava_gguf.checks.image_sequence import SequenceCheck
from llava_gguf.checks.text import NMSE_BOUNDS, TextCheck
from llava_gguf.checks.vision import VisionCheck
from llava_gguf.reports import crosscheck
from llava_gguf.run.workspace import write_table

DATA = Path(__file__).parent / "data" / "rehearsal"


def _load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def _synthetic_run(d: Path, kld: dict[str, float], vision_nmse: float = 3e-8) -> Path:
    """A run folder with the files the steps write, through the steps' own writers."""
    workspace.write_json(d / "machine.json", {"machine": {"arch": "aarch64", "emulation": "qemu-user",
                                                          "features": ["i8mm", "sve"]},
                                              "llama_cpp": {"version": "1 (0c1e570)", "system_info": {
                                                  "line": "n_threads = 2 / 2 | CPU : NEON = 1 | SVE = 1 |"}}})
    workspace.write_json(d / "vision_check/uniform.json", VisionCheck(
        "passed" if vision_nmse <= 1e-6 else "failed", "m", "uniform", nmse=vision_nmse, n_tokens=576).to_json())
    workspace.write_json(d / "image_sequence/wide.json", SequenceCheck(
        "passed", "m", "wide", n_tokens=1728, n_tokens_llava=1728, nmse=1e-9).to_json())
    text = TextCheck(Path("llava-tiny-F16.gguf"), "f16", "Hi", [1, 2], [1, 2], 2e-6, NMSE_BOUNDS["f16"],
                     tokenizer=pd.DataFrame({"text": ["a"], "llama.cpp": [[1]], "sentencepiece": [[1]],
                                             "match": [True]}))
    workspace.write_json(d / "text_check/llava-tiny-F16.json", text.to_json())
    variants = ["F16", *kld]
    write_table(pd.DataFrame({"variant": variants, "case": 0, "image_tokens": 2340, "image_tokens_llava": 2340}),
                d / "metrics/runs")
    write_table(pd.DataFrame({"variant": variants, "kld": [0.0, *kld.values()]}), d / "metrics/kld")
    workspace.write_json(d / "repack.json", {"Q4_0": {"types": ["q4_0"], "layouts": {"q4_0_8x8": 3},
                                                      "buffer_mib": 1.0}})
    return d


ALL_KLD = {"Q8_0": 1e-4, "Q6_K": 5e-4, "Q5_K_M": 2e-3, "Q4_K_M": 6e-3, "Q4_0": 1e-2}


def test_summary_reads_what_the_steps_wrote(tmp_path):
    s = crosscheck.run_summary(_synthetic_run(tmp_path, ALL_KLD))
    assert s["arch"] == "aarch64" and s["emulation"] == "qemu-user" and "SVE = 1" in s["system_info"]
    assert s["vision"]["uniform"] == {"status": "passed", "nmse": 3e-8, "tolerance": 1e-6, "n_tokens": 576}
    assert s["image_sequence"]["wide"]["n_tokens_llava"] == 1728
    assert s["text"]["llava-tiny-F16"] == {"outtype": "f16", "nmse": 2e-6, "bound": 2e-4, "passed": True}
    assert s["image_tokens"]["Q4_0/0"] == {"used": 2340, "llava": 2340}
    assert s["kld"] == {"F16": 0.0, **ALL_KLD} and s["repacked_types"] == ["q4_0"]
    assert all(ok for _, ok, _ in crosscheck.own_checks(s))


def test_checks_fail_on_a_missing_type_and_a_bad_kernel(tmp_path):
    s = crosscheck.run_summary(_synthetic_run(tmp_path, {k: v for k, v in ALL_KLD.items() if k != "Q6_K"}, 0.5))
    failed = {name for name, ok, _ in crosscheck.own_checks(s) if not ok}
    assert failed == {"vision uniform", "KLD per quant type"}
    x86 = crosscheck.run_summary(_synthetic_run(tmp_path / "x86", ALL_KLD))
    bad = dict(x86, kld={**x86["kld"], "Q4_0": 0.5}, image_tokens={"Q4_0/0": {"used": 2880, "llava": 2340}})
    failed = {name for name, ok, _ in crosscheck.compare(bad, x86) if not ok}
    assert failed == {"KLD Q4_0 vs x86", "image tokens equal"}


def test_empty_folder_gives_an_empty_summary_and_failed_checks(tmp_path):
    s = crosscheck.run_summary(tmp_path)
    assert s["vision"] == {} and s["kld"] == {} and s["arch"] is None
    assert not any(ok for _, ok, _ in crosscheck.own_checks(s))


@pytest.mark.parametrize("name", ["arm64", "x86_64"])
def test_recorded_summaries_are_what_the_summary_function_reads_from_their_runs(name):
    assert crosscheck.run_summary(DATA / f"{name}-run") == _load(name)


def test_recorded_arm_run_agrees_with_x86():
    arm, x86 = _load("arm64"), _load("x86_64")
    assert arm["arch"] == "aarch64" and arm["emulation"] == "qemu-user" and x86["arch"] == "x86_64"
    # the O6's kernels: SVE and i8mm seen by llama.cpp, K-quants and Q8_0 repacked (x86 AVX2 repacks fewer)
    assert "SVE = 1" in arm["system_info"] and "MATMUL_INT8 = 1" in arm["system_info"]
    assert {"q4_0", "q4_K", "q5_K", "q6_K", "q8_0"} <= set(arm["repacked_types"])
    assert set(x86["repacked_types"]) == {"q4_0", "q4_K"}
    # 128-bit SVE: Q4_0 takes the 4x8 i8mm layout (8x8 needs 256-bit SVE); x86 AVX2 takes 8x8
    assert list(arm["repack"]["Q4_0"]["layouts"])[0] == "q4_0_4x8" and "q4_0_8x8" in x86["repack"]["Q4_0"]["layouts"]
    for summary in (arm, x86):
        failed = [(n, d) for n, ok, d in crosscheck.own_checks(summary) if not ok]
        assert failed == []
    failed = [(n, d) for n, ok, d in crosscheck.compare(arm, x86) if not ok]
    assert failed == []
    assert arm["image_tokens"] == x86["image_tokens"] and arm["image_tokens"]
    for text in (arm["text"], x86["text"]):
        (f16,) = [v for v in text.values() if v["outtype"] == "f16"]
        assert math.isfinite(f16["nmse"]) and f16["nmse"] <= NMSE_BOUNDS["f16"]
    assert all(arm["kld"].get(t) is not None for t in crosscheck.REQUIRED_TYPES)


def test_record_copies_what_the_summary_reads(tmp_path):
    run = _synthetic_run(tmp_path / "run", ALL_KLD)
    summary = crosscheck.record(run, tmp_path / "rec" / "arm64.json")
    assert json.loads((tmp_path / "rec/arm64.json").read_text()) == summary
    assert crosscheck.run_summary(tmp_path / "rec/arm64-run") == summary
    assert (tmp_path / "rec/arm64-run/text_check/llava-tiny-F16.json").exists()
