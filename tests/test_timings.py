"""The timings parser on recorded logs of the pinned build and on older builds' formats (no tools needed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_gguf.llama_cpp.timings import parse_timings, parse_timings_file, timings_command

LOGS = Path(__file__).parent / "data" / "logs"


def _consistent_perf(t):
    pe, ev = t.prompt_eval, t.eval
    assert pe["ms_per_token"] == pytest.approx(pe["ms"] / pe["tokens"], abs=0.006)
    assert pe["tokens_per_s"] == pytest.approx(1000 * pe["tokens"] / pe["ms"], rel=1e-3)
    assert ev["ms_per_token"] == pytest.approx(ev["ms"] / ev["runs"], abs=0.006)
    assert t.total_tokens == pe["tokens"] + ev["runs"]


@pytest.mark.parametrize("name", ["lv4", "v-perf"])
def test_pinned_build_with_library_info(name):
    t = parse_timings_file(LOGS / f"mtmd-cli-0c1e570-{name}.log")
    assert t.format == "current"
    assert t.unparsed == []
    # LLaVA 1.6 anyres on test-1.jpeg: 5 image chunks of 576 tokens, each encoded in its own mtmd batch.
    assert [s["n_chunks"] for s in t.image_slices] == [1] * 5
    assert [s["first_chunk"] for s in t.image_slices] == [1, 2, 3, 4, 5]
    assert all(s["encode_ms"] >= 0 for s in t.image_slices)
    assert [(b["index"], b["total"], b["n_tokens"], b["chunk"]) for b in t.image_batches] == \
        [(1, 1, 576, c) for c in range(5)]
    assert t.image_tokens == 2880
    assert t.prompt_eval["tokens"] == 2895  # 2880 image tokens + 15 text tokens
    assert t.eval["runs"] == 7              # -n 8: the 8th token's decode is never synchronized
    assert t.load_ms > 0 and t.total_ms > t.prompt_eval["ms"]
    assert t.graphs_reused == 7
    assert t.perf_source == "llama_perf_context_print"
    _consistent_perf(t)
    assert t.notes == []


def test_pinned_build_debug_log_keeps_other_timings():
    t = parse_timings_file(LOGS / "mtmd-cli-0c1e570-v-perf.log")
    names = [o["name"] for o in t.other]
    assert names.count("sched_reserve reserve") == 2
    assert any("fitting params" in n for n in names)


@pytest.mark.parametrize("name", ["default", "perf"])
def test_pinned_build_default_verbosity(name):
    """Without -lv 4 the pinned build prints only the batch encode times; --perf adds nothing."""
    t = parse_timings_file(LOGS / f"mtmd-cli-0c1e570-{name}.log")
    assert t.format == "current"
    assert len(t.image_slices) == 5 and all(s["n_chunks"] == 1 for s in t.image_slices)
    assert t.image_batches == [] and not t.has_perf
    assert t.load_ms is None and t.unparsed == []


def test_legacy_handwritten_build_7110():
    t = parse_timings_file(LOGS / "mtmd-cli-b7110-handwritten.log")
    assert t.format == "legacy"
    assert (t.build, t.commit) == (7110, "3f3a4fb9c")
    assert t.image_slices == [{"index": 0, "encode_ms": 9964.0, "media": "image", "n_chunks": 1}]
    assert [(b["index"], b["total"], b["decode_ms"], b["n_tokens"], b["chunk"]) for b in t.image_batches] == \
        [(1, 2, 177913.0, 2048, 0), (2, 2, 92931.0, 832, 0)]
    assert t.image_decode_ms == 177913.0 + 92931.0
    assert t.prompt_eval == {"ms": 282489.37, "tokens": 2896, "ms_per_token": 97.54, "tokens_per_s": 10.25}
    assert t.eval == {"ms": 27725.37, "runs": 127, "ms_per_token": 218.31, "tokens_per_s": 4.58}
    assert t.load_ms == 10412.93 and t.total_ms == 321873.52 and t.graphs_reused == 126
    _consistent_perf(t)
    assert t.unparsed == [] and t.notes == []


@pytest.mark.parametrize("line, slice_ms, media", [
    ("image slice encoded in 9964 ms", 9964.0, "image"),
    ("image/slice encoded in 1308 ms", 1308.0, "image"),           # mid-2025 builds
    ("audio slice encoded in 12 ms", 12.0, "audio"),
    ("encode_image_with_clip: image encoded in  9964.00 ms by CLIP (    3.46 ms per image patch)", 9964.0, "image"),
    ("\x1b[34m0.01.234.567\x1b[0m \x1b[32mI \x1b[0mimage slice encoded in 77 ms", 77.0, "image"),  # colours
])
def test_legacy_slice_lines(line, slice_ms, media):
    t = parse_timings(line + "\n")
    assert t.format == "legacy"
    assert [(s["encode_ms"], s["media"]) for s in t.image_slices] == [(slice_ms, media)]
    assert t.unparsed == []


@pytest.mark.parametrize("prefix", ["", "llama_perf_context_print: ", "llama_print_timings: ",
                                    "0.00.445.402 I llama_perf_context_print: ",
                                    "slot print_timing: id  0 | task 0 | "])
def test_perf_lines_any_prefix(prefix):
    text = (f"{prefix}prompt eval time =     915.13 ms /    51 tokens (   17.94 ms per token,    55.73 tokens per second)\n"
            f"{prefix}       eval time =   14085.85 ms /   178 runs   (   79.13 ms per token,    12.64 tokens per second)\n"
            f"{prefix}      total time =   20699.49 ms /   229 tokens\n")
    t = parse_timings(text)
    assert t.prompt_eval == {"ms": 915.13, "tokens": 51, "ms_per_token": 17.94, "tokens_per_s": 55.73}
    assert t.eval == {"ms": 14085.85, "runs": 178, "ms_per_token": 79.13, "tokens_per_s": 12.64}
    assert (t.total_ms, t.total_tokens) == (20699.49, 229)
    assert t.unparsed == []


def test_oldest_perf_block_and_sampling():
    t = parse_timings(
        "llama_print_timings:        load time =     618.92 ms\n"
        "llama_print_timings:      sample time =      24.62 ms /   227 runs   (    0.11 ms per token,  9220.90 tokens per second)\n"
        "llama_print_timings: prompt eval time =     927.17 ms /    49 tokens (   18.92 ms per token,    52.85 tokens per second)\n"
        "llama_print_timings:        eval time =   14085.85 ms /   178 runs   (   79.13 ms per token,    12.64 tokens per second)\n"
        "llama_print_timings:       total time =   20699.49 ms\n")
    assert t.format == "legacy" and t.perf_source == "llama_print_timings"
    assert t.sampling == {"ms": 24.62, "runs": 227, "ms_per_token": 0.11, "tokens_per_s": 9220.9}
    assert (t.load_ms, t.total_ms, t.total_tokens) == (618.92, 20699.49, None)


def test_common_perf_print_block():
    t = parse_timings(
        "common_perf_print:    sampling time =      12.50 ms\n"
        "common_perf_print:    samplers time =      10.25 ms /    16 tokens\n"
        "common_perf_print:        load time =      30.16 ms\n"
        "common_perf_print: prompt eval time =     305.27 ms /  2895 tokens (    0.11 ms per token,  9483.47 tokens per second)\n"
        "common_perf_print:        eval time =      14.22 ms /    15 runs   (    0.95 ms per token,  1054.63 tokens per second)\n"
        "common_perf_print:       total time =     346.36 ms /  2910 tokens\n"
        "common_perf_print: unaccounted time =      14.37 ms /   4.1 %      (total - sampling - prompt eval - eval) / (total)\n"
        "common_perf_print:    graphs reused =         15\n")
    assert t.sampling == {"ms": 12.5, "runs": None, "samplers_ms": 10.25, "samplers_runs": 16}
    assert t.other == [{"line": 7, "name": "unaccounted time", "ms": 14.37, "percent": 4.1}]
    assert t.graphs_reused == 15 and t.unparsed == []


def test_zero_duration_gives_null_not_infinity():
    t = parse_timings("llama_perf_context_print: prompt eval time =       0.00 ms /     1 tokens "
                      "(    0.00 ms per token,      inf tokens per second)\n")
    data = json.loads(json.dumps(t.to_dict()))  # strict JSON round trip
    assert data["prompt_eval"] == {"ms": 0.0, "tokens": 1, "ms_per_token": 0.0, "tokens_per_s": None}


def test_lines_that_look_like_timings_are_reported():
    text = "\n".join([
        "image decoded (batch 1/2) in ?? ms",
        "llama_perf_context_print: prompt eval time =     305.27 ms /",  # cut off mid-line
        "llama_perf_context_print:        eval time =      14.22 ms",   # no run count
        "encoder finished after 12.5 ms of work",
        "llama_kv_cache: size =    8.00 MiB (  4096 cells,   2 layers,  1/1 seqs)",  # not a timing
        "print_info: f_norm_rms_eps        = 1.0e-05",                              # not a timing
        "The image shows a newspaper.",
    ])
    t = parse_timings(text)
    assert [u["line"] for u in t.unparsed] == [1, 2, 3, 4]
    assert t.unparsed[0]["text"] == "image decoded (batch 1/2) in ?? ms"
    assert t.prompt_eval is None and t.eval is None and t.image_batches == []


def test_truncated_run_and_repeated_perf_are_noted():
    t = parse_timings("encoding image slice...\nimage slice encoded in 10 ms\n"
                      "decoding image batch 1/2, n_tokens_batch = 2048\n")
    assert t.image_batches == [] and any("1/2" in n for n in t.notes)
    block = "llama_perf_context_print:        load time =      30.16 ms\n"
    t = parse_timings(block + block.replace("30.16", "40.00"))
    assert t.load_ms == 40.0 and any("second 'load'" in n for n in t.notes)


def test_timings_command_json_and_cli():
    log = LOGS / "mtmd-cli-b7110-handwritten.log"
    data = json.loads(timings_command(log))
    assert data["prompt_eval"]["tokens"] == 2896 and data["image_decode_ms"] == 270844.0
    proc = subprocess.run([sys.executable, "-m", "llava_gguf", "timings", str(log)],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == data


def test_missing_log_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.log"):
        parse_timings_file(tmp_path / "nope.log")
