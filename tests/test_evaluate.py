"""llama-mtmd-cli runner: stream splitting, options, error cases, and a tiny end-to-end run."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from llava_gguf.llama_cpp import mtmd as evaluate
from llava_gguf.llama_cpp.mtmd import EvaluationError, MtmdOptions, run_mtmd
from llava_gguf.steps.evaluate import run_evaluations
from llava_gguf.run.params import EvaluateParams
from llava_gguf.llama_cpp.timings import parse_timings_file

PROMPT = "Describe this image."


# ----------------------------------------------------------------------------- pure parts
def _stream(*reads: bytes, dt: float = 0.1) -> list[tuple[float, bytes]]:
    return [(1.0 + i * dt, b) for i, b in enumerate(reads)]


def test_split_pieces_n_predict_stop():
    pieces, times, stop = evaluate._split_pieces(_stream(b"\n", b"The", b" cat", b" sat", b"\n\n"), 3)
    assert pieces == [b"The", b" cat", b" sat"] and stop == "n_predict"
    assert times == pytest.approx([1.1, 1.2, 1.3])


def test_split_pieces_end_of_generation_newline():
    pieces, _, stop = evaluate._split_pieces(_stream(b"\n", b"The", b" cat", b"\n", b"\n\n"), 8)
    assert pieces == [b"The", b" cat"] and stop == "eog"


def test_split_pieces_newline_token_vs_eog_newline_at_n_predict():
    # n_predict pieces, the last a newline token: one decode (a full token gap) before "\n\n".
    pieces, _, stop = evaluate._split_pieces(_stream(b"\n", b"a", b"b", b"c", b"\n", b"\n\n"), 4)
    assert pieces == [b"a", b"b", b"c", b"\n"] and stop == "n_predict"
    # n_predict - 1 pieces + the EOG newline written right before "\n\n".
    reads = _stream(b"\n", b"a", b"b", b"c", b"\n") + [(1.4001, b"\n\n")]
    pieces, _, stop = evaluate._split_pieces(reads, 4)
    assert pieces == [b"a", b"b", b"c"] and stop == "eog"


def test_split_pieces_coalesced_reads():
    # The prompt newline shares a read with the first piece, "\n\n" with the last.
    pieces, _, stop = evaluate._split_pieces(_stream(b"\nThe", b" cat sat", b" down\n\n"), 4)
    assert pieces == [b"The", b" cat sat", b" down"] and stop == "eog"


def test_split_pieces_uses_eval_runs_for_the_stop_reason():
    # -n 4 and 3 eval runs: the n_predict stop, even though a loaded reader got 3 reads for 4 tokens.
    reads = _stream(b"\nThe", b" cat sat", b" down\n\n")
    pieces, _, stop = evaluate._split_pieces(reads, 4, eval_runs=3)
    assert pieces == [b"The", b" cat sat", b" down"] and stop == "n_predict"
    # 2 eval runs with -n 8: end of generation; its newline shares the last read.
    pieces, _, stop = evaluate._split_pieces(_stream(b"\n", b"The", b" cat\n", b"\n\n"), 8, eval_runs=2)
    assert pieces == [b"The", b" cat"] and stop == "eog"
    pieces, _, stop = evaluate._split_pieces(_stream(b"\n", b"a", b"\n", b"\n\n"), -1, eval_runs=1)
    assert pieces == [b"a"] and stop == "eog"


def test_count_check_against_eval_runs():
    from llava_gguf.llama_cpp.timings import Timings

    t = Timings(eval={"ms": 10.0, "runs": 7})
    assert evaluate._check_count(8, "n_predict", t, 8)[0]
    assert evaluate._check_count(7, "eog", t, 16)[0]
    ok, msg = evaluate._check_count(5, "n_predict", t, 8)
    assert not ok and "more than one token" in msg
    assert not evaluate._check_count(8, "n_predict", Timings(), 8)[0]


def test_options_from_params_pass_through():  # every option: tests/test_flags.py
    ev = EvaluateParams(n_predict=64, seed=7, threads=3, threads_batch=4, batch_size=256, ubatch_size=128,
                        ctx_size=2048, flash_attn="on", cache_type_k="q8_0", cache_type_v="f16", chat_template="vicuna")
    args = MtmdOptions(ev).args()
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs == {"-n": "64", "--seed": "7", "--temp": "0.0", "-c": "2048", "-t": "3", "-tb": "4",
                     "-b": "256", "-ub": "128", "-fa": "on", "-ctk": "q8_0", "-ctv": "f16",
                     "--chat-template": "vicuna", "-lv": "4"}
    assert "-t" not in MtmdOptions().args()  # None: the tool's default


# ----------------------------------------------------------------------------- error cases
def _fake_tool(tmp_path: Path, body: str) -> Path:
    tool = tmp_path / "llama-mtmd-cli"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tool


@pytest.fixture
def fake_inputs(tmp_path):
    files = {n: tmp_path / n for n in ("text.gguf", "mmproj.gguf", "image.jpg")}
    for p in files.values():
        p.write_bytes(b"GGUF")
    return files


def test_missing_image_fails_before_running(tmp_path, fake_inputs):
    log = tmp_path / "logs" / "run.log"
    with pytest.raises(FileNotFoundError, match="image .*missing.jpg"):
        run_mtmd(sys.executable, fake_inputs["text.gguf"], fake_inputs["mmproj.gguf"], tmp_path / "missing.jpg",
                 PROMPT, MtmdOptions(), log)
    assert not log.exists()


def test_crash_keeps_log_and_names_signal(tmp_path, fake_inputs):
    tool = _fake_tool(tmp_path, "echo '0.00.001.000 I main: loading model: x' >&2\n"
                                "echo 'encoding image slice...' >&2\nprintf '\\n'\nkill -SEGV $$\n")
    log = tmp_path / "logs" / "crash.log"
    with pytest.raises(EvaluationError, match=r"(?s)crashed \(SIGSEGV\).*crash\.log"):
        run_mtmd(tool, fake_inputs["text.gguf"], fake_inputs["mmproj.gguf"], fake_inputs["image.jpg"],
                 PROMPT, MtmdOptions(), log)
    assert "encoding image slice..." in log.read_text()


def test_exit_status_keeps_log(tmp_path, fake_inputs):
    tool = _fake_tool(tmp_path, "echo 'E something went wrong' >&2\nexit 3\n")
    log = tmp_path / "fail.log"
    with pytest.raises(EvaluationError, match=r"(?s)exit status 3.*fail\.log.*something went wrong"):
        run_mtmd(tool, fake_inputs["text.gguf"], fake_inputs["mmproj.gguf"], fake_inputs["image.jpg"],
                 PROMPT, MtmdOptions(), log)
    assert log.read_text() == "E something went wrong\n"


# ----------------------------------------------------------------------------- with llama.cpp
@pytest.fixture(scope="module")
def jpeg():
    from llava_gguf.llama_cpp import toolchain

    return toolchain.source_asset(evaluate.DEFAULT_IMAGE)


@pytest.mark.llama_cpp
def test_unreadable_gguf(tmp_path, llama_tool, tiny_ggufs, jpeg):
    cli = llama_tool("llama-mtmd-cli")
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny_ggufs["text"].read_bytes()[:100_000])
    log = tmp_path / "bad.log"
    with pytest.raises(EvaluationError) as err:
        run_mtmd(cli, bad, tiny_ggufs["mmproj"], jpeg, PROMPT, MtmdOptions(EvaluateParams(n_predict=2)), log)
    msg = str(err.value)
    assert "exit status 1" in msg and str(log) in msg
    assert f"text GGUF {bad} is not a readable GGUF" in msg and "mmproj" not in msg.split("command:")[0]
    assert log.exists()


@pytest.mark.llama_cpp
def test_run_mtmd_end_to_end(tmp_path, llama_tool, tiny_ggufs, jpeg):
    cli = llama_tool("llama-mtmd-cli")
    log = tmp_path / "e2e.log"
    r = run_mtmd(cli, tiny_ggufs["text"], tiny_ggufs["mmproj"], jpeg, PROMPT,
                 MtmdOptions(EvaluateParams(n_predict=4, threads=2, ctx_size=4096)), log)
    assert r.returncode == 0 and r.answer
    t = r.timings
    assert t.format == "current" and t.unparsed == []
    assert t.prompt_eval and t.eval, log.read_text()[-2000:]
    # LLaVA 1.6's own count for test-1.jpeg (576 + 36 x 49; patch 0002), plus 15 text tokens.
    assert t.image_tokens == 2340 and t.prompt_eval["tokens"] == 2355
    assert t.eval["runs"] == 3  # n_predict 4: the 4th token's decode is never synchronized
    assert parse_timings_file(log) == t
    assert len(r.pieces) == len(r.token_times_s) == r.n_tokens
    assert r.stop == "n_predict"
    if r.token_check_ok:  # one read per token (the usual case)
        assert r.n_tokens == 4 and len(r.itl_ms) == 3
    else:  # a loaded machine let several tokens share a read: flagged, never silently miscounted
        assert r.n_tokens < 4 and "more than one token" in r.token_check
    assert 0 < r.ttft_after_load_ms < r.ttft_ms < 1000 * r.wall_s
    assert all(x >= 0 for x in r.itl_ms)
    assert r.peak_rss_mib > tiny_ggufs["text"].stat().st_size / 2**20  # the mapped weights were touched


@pytest.mark.llama_cpp
def test_run_evaluations_writes_logs_and_metrics(local_run, llama_tool, tiny_ggufs):
    llama_tool("llama-mtmd-cli")
    run = local_run(evaluate={"n_predict": 3, "threads": 2, "cases": [{"prompt": PROMPT}]})
    df = run_evaluations(run, {"F16": tiny_ggufs["text"]}, tiny_ggufs["mmproj"])
    assert list(df["variant"]) == ["F16"] and list(df["case"]) == [0]
    assert df.loc[0, "prompt_tokens"] == 2355 and df.loc[0, "eval_runs"] == 2
    # The image tokens used, beside the count LLaVA 1.6 itself uses for the image.
    assert df.loc[0, "image_tokens"] == df.loc[0, "image_tokens_llava"] == 2340
    assert df.loc[0, "image_arrangement"].startswith("llava 1.6")
    assert (run.dir / "logs" / "F16__0.log").is_file()
    record = json.loads((run.dir / "metrics" / "F16__0.json").read_text())
    assert record["options"]["n_predict"] == 3 and record["timings"]["eval"]["runs"] == 2
    assert record["image_tokens_llava"] == 2340
    assert record["command"][record["command"].index("-n") + 1] == "3"
    times = record["token_times_s"]
    assert len(times) == len(record["pieces"]) == df.loc[0, "n_tokens"] == len(record["itl_ms"]) + 1
    assert times == sorted(times) and 1000 * times[0] == pytest.approx(df.loc[0, "ttft_ms"])


def test_run_evaluations_missing_case_image(local_run, fake_inputs, monkeypatch, tmp_path):
    from llava_gguf.llama_cpp import toolchain

    monkeypatch.setattr(toolchain, "find_tool", lambda *a, **k: Path(os.devnull))
    run = local_run(evaluate={"cases": [{"prompt": PROMPT, "image": str(tmp_path / "nope.jpg")}]})
    with pytest.raises(FileNotFoundError, match=r"evaluate.cases\[0\].image"):
        run_evaluations(run, {"F16": fake_inputs["text.gguf"]}, fake_inputs["mmproj.gguf"])
    assert not (run.dir / "logs").exists() or not any((run.dir / "logs").iterdir())
