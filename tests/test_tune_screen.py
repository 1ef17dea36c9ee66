"""07_tune's type screen (tune_screen), the bound arithmetic (tune_bound) and the published-recipe baseline
(tune_published), without llama.cpp: recorded llama-bench output and simulated tools."""
from __future__ import annotations

from pathlib import Path

import pytest

from llava_gguf.steps import tune_quality, tune_screen
from llava_gguf.tune import bound as tune_bound, published as tune_published
from llava_gguf.llama_cpp import llama_bench, toolchain
from llava_gguf.llama_cpp.repack_log import parse_repack_log
from llava_gguf.reports import tables
from llava_gguf.tune.config import Config

LOGS = Path(__file__).parent / "data" / "logs"


def _bench(pp: float, tg: float, threads: int = 2, log: str | None = None) -> llama_bench.BenchRun:
    tests = [llama_bench.BenchTest("pp512", 512, 0, threads, pp, None, (pp,)),
             llama_bench.BenchTest("tg128", 0, 128, threads, tg, None, (tg,))]
    return llama_bench.BenchRun(Path("x.gguf"), tests, parse_repack_log((LOGS / log).read_text() if log else ""))


def _screen(quant: str, pp: float, tg: float, kld: float | None = None, **kw) -> tune_screen.TypeScreen:
    return tune_screen.TypeScreen(quant, "test", file=Path(f"{quant}.gguf"), bench=_bench(pp, tg, **kw), kld=kld)


# ----------------------------------------------------------------------------- screening out
def test_a_type_slower_at_both_than_a_more_precise_one_is_screened_out():
    # Rates shaped like the 7B here: Q5_K_M prefills faster, Q4_0 generates faster: both stay.
    screens = [_screen("Q8_0", 30.0, 2.0, 0.001), _screen("Q6_K", 20.0, 1.8, 0.003), _screen("Q5_K_M", 42.8, 2.8, 0.005),
               _screen("Q4_K_M", 40.0, 3.3, 0.02), _screen("Q4_0", 27.0, 3.4, 0.11), _screen("IQ4_NL", 39.0, 3.2, 0.03)]
    kept = tune_screen.screen_out(screens, None, 0.05, margin=0.1)
    by = {s.quant: s for s in screens}
    assert kept == ["Q8_0", "Q5_K_M", "Q4_K_M", "IQ4_NL"]
    assert by["Q4_0"].reason == "KL divergence 0.11 over tune.kld_budget 0.05"
    # Q6_K: Q8_0 is more precise and faster at both beyond 10 %.
    assert by["Q6_K"].reason.startswith("dominated by Q8_0") and "tune.screen_margin 10%" in by["Q6_K"].reason
    # IQ4_NL is within 10 % of Q4_K_M at both: not dominated beyond the margin, kept.
    assert by["IQ4_NL"].status == "kept"
    # With no margin, Q4_K_M (more precise, faster at both) screens IQ4_NL out.
    screens = [_screen("Q4_K_M", 40.0, 3.3, 0.02), _screen("IQ4_NL", 39.0, 3.2, 0.03)]
    assert tune_screen.screen_out(screens, None, 0.05, margin=0.0) == ["Q4_K_M"]


def test_what_is_screened_out_does_not_depend_on_the_order_of_the_types():
    """Precision compares KLDs where both are known and bits per weight otherwise, so domination is not
    transitive: Q6_K (no KLD) beats Q5_K_S on bits, Q5_K_S beats Q8_0 on KLD, Q6_K does not beat Q8_0.
    Decided one type at a time, Q8_0 survived when Q5_K_S was screened out before it was looked at."""
    def screens():
        return [_screen("Q6_K", 100.0, 10.0, None), _screen("Q5_K_S", 50.0, 5.0, 0.004),
                _screen("Q8_0", 25.0, 2.5, 0.005)]

    results = set()
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]):
        listed = [screens()[i] for i in order]
        kept = tune_screen.screen_out(listed, None, 0.05, margin=0.1)
        by = {s.quant: s for s in listed}
        assert by["Q8_0"].reason.startswith("dominated by Q5_K_S")
        assert by["Q5_K_S"].reason.startswith("dominated by Q6_K")
        results.add(tuple(kept))
    assert results == {("Q6_K",)}


def test_the_seed_is_never_dominated_and_failures_and_missing_files_say_why():
    seed = _screen("Q5_K_M", 10.0, 1.0, 0.005)
    fast = _screen("Q8_0", 50.0, 5.0, 0.001)
    broken = tune_screen.TypeScreen("IQ4_NL", "test", file=Path("IQ4_NL.gguf"), bench_error="exit status 1")
    nofile = tune_screen.TypeScreen("Q4_K_S", "test", status="screened out", reason="not quantized: no disk")
    kept = tune_screen.screen_out([fast, seed, broken, nofile], {"Q5_K_M", "Q8_0", "IQ4_NL"}, 0.05, 0.1)
    assert kept == ["Q8_0", "Q5_K_M"] and broken.reason == "llama-bench failed: exit status 1"
    assert nofile.reason == "not quantized: no disk"
    # `allowed` (tune's KLD decision, with its closest-type fallback) decides over the KLD figure.
    lone = _screen("Q4_0", 10.0, 1.0, 0.2)
    assert tune_screen.screen_out([lone], {"Q4_0"}, 0.05, 0.1) == ["Q4_0"]


def test_unknown_kld_compares_bits_per_weight():
    q8, q4 = _screen("Q8_0", 50.0, 5.0), _screen("Q4_0", 40.0, 4.0)
    assert tune_screen.screen_out([q8, q4], None, 0.05, 0.1) == ["Q8_0"]
    q8, q4 = _screen("Q8_0", 40.0, 4.0), _screen("Q4_0", 50.0, 5.0)  # the less precise one is never the dominator
    assert tune_screen.screen_out([q8, q4], None, 0.05, 0.1) == ["Q8_0", "Q4_0"]


def test_bench_groups_share_one_load_unless_pinned():
    plain = [Config("Q5_K_M", threads=1), Config("Q5_K_M", threads=2)]
    assert tune_screen.bench_groups(plain) == [{"threads": [1, 2], "cpu_mask": None, "cpu_strict": None}]
    pinned = [Config("Q5_K_M", threads=4, cpu_mask="0xf0", cpu_strict=1), Config("Q5_K_M", threads=12)]
    assert tune_screen.bench_groups(pinned) == [{"threads": [12], "cpu_mask": None, "cpu_strict": None},
                                               {"threads": [4], "cpu_mask": "0xf0", "cpu_strict": 1}]


def test_bench_types_and_the_repack_verdict_from_the_log(tmp_path):
    """A simulated llama-bench giving the recorded x86 outputs: rates, the verdict from the log, and the
    table's expectation beside it (a disagreement is a note)."""
    recorded = {"Q4_0.gguf": "bench-0c1e570-x86-Q4_0-jsonl-v.log", "Q5_K_M.gguf": "bench-0c1e570-x86-Q5_K_M-jsonl-v.log"}
    calls = []

    def runner(tool, gguf, threads, n_prompt, n_gen, log_file, reps, mask, strict, timeout):
        calls.append((Path(gguf).name, threads, n_prompt, n_gen))
        if Path(gguf).name == "IQ4_NL.gguf":
            raise llama_bench.BenchParseError("no llama-bench result in the output")
        text = (LOGS / recorded[Path(gguf).name]).read_text()
        return llama_bench.BenchRun(Path(gguf), llama_bench.parse_bench_output(text), parse_repack_log(text), log_file)

    screens = [tune_screen.TypeScreen(q, "test", repacked_expected=exp, file=Path(f"{q}.gguf"))
               for q, exp in (("Q5_K_M", False), ("Q4_0", False), ("IQ4_NL", True))]
    tune_screen.bench_types(Path("llama-bench"), screens, [Config("Q5_K_M", threads=t) for t in (1, 2)], 64, 16, 1,
                            tmp_path, runner=runner)
    assert calls == [("Q5_K_M.gguf", [1, 2], 64, 16), ("Q4_0.gguf", [1, 2], 64, 16), ("IQ4_NL.gguf", [1, 2], 64, 16)]
    rows = {r["quant"]: r for r in tune_screen.screen_table(screens).to_dict("records")}
    assert rows["Q4_0"]["repacked"] is True and rows["Q4_0"]["repacked_types"] == "q4_0"
    assert rows["Q4_0"]["pp_tokens_per_s"] == pytest.approx(35941.3)  # the best repetition and rows["Q4_0"]["pp_threads"] == 2
    assert rows["Q5_K_M"]["repacked"] is False and rows["Q5_K_M"]["tg_threads"] == 1
    assert screens[2].bench_error.startswith("no llama-bench result")
    # Q4_0 marked "not expected" on purpose: the log wins, and the disagreement is said.
    notes = tune_screen.repack_mismatches(screens)
    assert notes == ["Q4_0: the repack table expected its q4_0 matrices left as they are, the load log says repacked"]
    result = tune_screen.ScreenResult(screens, ["Q5_K_M", "Q4_0"])
    assert result.best_pp() == {"quant": "Q4_0", "test": "pp64", "tokens_per_s": pytest.approx(35941.3),
                                "threads": 2}


def test_coverage_gives_every_type_and_budget_an_answer_or_a_reason():
    screens = [_screen("Q5_K_M", 1, 1), _screen("Q4_K_M", 1, 1), _screen("Q6_K", 1, 1)]
    screens[2].status, screens[2].reason = "screened out", "dominated by Q8_0"
    rows = [{"phase": "screen-baseline", "quant": "Q5_K_M", "budget": "full", "status": "ok", "answer_s": 3.0, "config": "a"},
            {"phase": "screen-quant types", "quant": "Q5_K_M", "budget": "full", "status": "ok", "answer_s": 2.5, "config": "b"},
            {"phase": "confirm", "quant": "Q5_K_M", "budget": "single", "status": "ok", "answer_s": 0.5, "config": "c"},
            {"phase": "screen-quant types", "quant": "Q4_K_M", "budget": "full", "status": "ok", "answer_s": 2.0, "config": "d"}]
    skipped = [{"config": "e", "quant": "Q4_K_M", "budget": "single", "why": "over tune.budget_minutes"}]
    cov = tune_screen.coverage(rows, screens, ["full", "single"], skipped).set_index(["quant", "budget"])
    assert cov.loc[("Q5_K_M", "full"), "answer_s"] == 2.5 and cov.loc[("Q5_K_M", "full"), "config"] == "b"
    assert cov.loc[("Q5_K_M", "single"), "why_not"] == "not screened at this budget"  # confirm runs are not screening
    assert cov.loc[("Q4_K_M", "single"), "why_not"] == "over tune.budget_minutes"
    assert cov.loc[("Q6_K", "full"), "why_not"] == cov.loc[("Q6_K", "single"), "why_not"] == "dominated by Q8_0"


def test_coverage_says_this_budgets_own_reason_before_a_failure_elsewhere():
    screens = [_screen("Q4_K_M", 1, 1), _screen("Q4_0", 1, 1)]
    rows = [{"phase": "screen-quant types", "quant": "Q4_K_M", "budget": "full", "status": "failed",
             "error": "llama-mtmd-cli exited with status 1\nlast lines: ...", "config": "a"},
            {"phase": "screen-quant types", "quant": "Q4_0", "budget": "single", "status": "failed",
             "error": "llama-mtmd-cli crashed (SIGSEGV)", "config": "b"},
            {"phase": "screen-quant types", "quant": "Q4_0", "budget": "full", "status": "failed",
             "error": "llama-mtmd-cli ran past its limit", "config": "c"}]
    skipped = [{"config": "d", "quant": "Q4_K_M", "budget": "single", "why": "over tune.budget_minutes"},
               {"config": "e", "quant": "Q4_0", "budget": "single", "why": "over tune.budget_minutes"}]
    cov = tune_screen.coverage(rows, screens, ["full", "single", "half"], skipped).set_index(["quant", "budget"])
    assert cov.loc[("Q4_K_M", "full"), "why_not"] == "failed: llama-mtmd-cli exited with status 1"
    # The full budget's failure is not why the single budget has no answer: the time ran out there.
    assert cov.loc[("Q4_K_M", "single"), "why_not"] == "over tune.budget_minutes"
    # Neither a failure nor a skip here: the failure elsewhere, said to be elsewhere.
    assert cov.loc[("Q4_K_M", "half"), "why_not"] == "failed at budget full: llama-mtmd-cli exited with status 1"
    # This budget's own failure first, before its skip and before the other budget's failure.
    assert cov.loc[("Q4_0", "single"), "why_not"] == "failed: llama-mtmd-cli crashed (SIGSEGV)"
    assert cov.loc[("Q4_0", "full"), "why_not"] == "failed: llama-mtmd-cli ran past its limit"


# ----------------------------------------------------------------------------- the bound
def test_weight_bytes_skip_the_gathered_embedding_unless_tied():
    tensors = {"token_embd.weight": 100, "output.weight": 100, "blk.0.attn_q.weight": 50}
    assert tune_bound.weight_bytes_per_token(tensors) == 150
    assert tune_bound.weight_bytes_per_token({"token_embd.weight": 100, "blk.0.attn_q.weight": 50}) == 150


def test_kv_bytes_of_a_7b():
    # LLaVA 1.6 Vicuna 7B: 32 layers, 4096 wide, 32 heads, no GQA: 512 KiB per position at f16.
    assert tune_bound.kv_bytes_per_position(32, 4096, 32, 32) == 32 * 4096 * 4
    assert tune_bound.kv_bytes_per_position(32, 4096, 32, 32, "q8_0", "q8_0") == pytest.approx(32 * 4096 * 2 * 34 / 32)


def test_the_bound_arithmetic_on_the_7b_figures():
    """The issue's full-budget figures: 2,340 image tokens decoded in 59 s, 135 tokens at 243 ms each, a
    Q5_K_M 7B of 4.78 GB; a 42.8 t/s pp512 ceiling and 10 GB/s copy bandwidth (both assumed)."""
    stages = {"image_tokens": 2340, "image_decode_ms": 59000.0, "prompt_tokens": 2380, "eval_ms_per_token": 243.0}
    model = {"weight_bytes_per_token": 4.78e9, "n_layer": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 32}
    ceiling = {"quant": "Q4_K_M", "test": "pp512", "tokens_per_s": 42.8, "threads": 2}
    b = tune_bound.configuration_bound(stages, model, ceiling, {"GB_per_s": 10.0}, None, 135)
    pre, gen = b["prefill"], b["generation"]
    assert pre["tokens_per_s"] == pytest.approx(2340 / 59.0)
    assert pre["percent"] == pytest.approx(100 * (2340 / 59.0) / 42.8)
    assert pre["text"].startswith("prefill at 93% of this CPU's ceiling") and "Q4_K_M at 2 threads" in pre["text"]
    kv = 32 * 4096 * 4 * (2380 + 135 / 2)
    assert gen["bytes_per_token"] == pytest.approx(4.78e9 + kv)
    assert gen["percent"] == pytest.approx(100 * (4.78e9 + kv) / 0.243 / 1e9 / 10.0)
    assert gen["text"].startswith(f"generation at {gen['percent']:.0f}% of memory bandwidth")
    # Unmeasured: said, never a number.
    none = tune_bound.configuration_bound({}, model, None, None, None, 135)
    assert none["prefill"]["percent"] is None and "not measured" in none["prefill"]["text"]
    assert none["generation"]["percent"] is None and "not measured" in none["generation"]["text"]


def test_the_copy_probe_measures_something():
    got = tune_bound.copy_bandwidth(threads=2, mib=16, repeats=2)
    assert got["GB_per_s"] > 0.1 and got["threads"] == 2 and "read + write" in got["method"]


def test_bounds_per_budget_from_the_tiny_gguf(tiny_ggufs):
    chosen = {"full": {"config": "x", "quant": "F16", "threads": 1, "image_tokens": 100, "image_decode_ms": 10.0,
                       "eval_ms_per_token": 2.0, "cache_type": None}}
    got = tune_bound.bounds(chosen, {"F16": tiny_ggufs["text"]}, {"tokens_per_s": 20000.0, "test": "pp64",
                                                                   "quant": "F16", "threads": 1}, 8,
                            bandwidth={"GB_per_s": 5.0})
    model = tune_bound.model_bytes(tiny_ggufs["text"])
    assert model["n_layer"] == 2 and 0 < model["weight_bytes_per_token"] < model["weight_bytes"]
    assert got["full"]["prefill"]["percent"] == pytest.approx(50.0)
    assert got["full"]["generation"]["weight_bytes_per_token"] == model["weight_bytes_per_token"]


# ----------------------------------------------------------------------------- the published recipe
def test_published_baseline_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path))
    monkeypatch.delenv(tune_published.ENV, raising=False)
    key = toolchain.build_key(unpatched=True)  # 0c1e570-unpatched-<hash of the build fixes>
    # The description names each build fix the published recipe's build carries (0005, the AMX fix).
    fixes = [p.name.split("-", 1)[0] for p in toolchain.patch_files(unpatched=True)]
    assert fixes == ["0005"] and tune_published.DESCRIPTION.endswith("but its build fix 0005")
    assert tune_published.unpatched_cli() == tmp_path / f"llama.cpp-{key}" / "bin" / "llama-mtmd-cli"
    cli, why = tune_published.find_or_build("off")
    assert cli is None and why == "not measured: tune.published_baseline is off"
    cli, why = tune_published.find_or_build("if-built")
    assert cli is None and "is absent" in why and "make llama-cpp-unpatched" in why

    def failing(**kw):
        assert kw == {"unpatched": True}
        raise RuntimeError("llama.cpp build failed (exit 2); see build.log")
    cli, why = tune_published.find_or_build("build", build=failing)
    assert cli is None and why.startswith("not measured: the unpatched llama.cpp build failed (llama.cpp build failed")

    def broken(**kw):
        raise KeyError("build_dir")  # a bug in the build code, not a failed build: it is not hidden
    with pytest.raises(KeyError):
        tune_published.find_or_build("build", build=broken)
    # The environment wins over the params, and a built tool is used without building.
    tool = tune_published.unpatched_cli()
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv(tune_published.ENV, "if-built")
    assert tune_published.find_or_build("off") == (tool, None)
    monkeypatch.setenv(tune_published.ENV, "sometimes")
    with pytest.raises(ValueError, match="build, if-built, off"):
        tune_published.find_or_build("build")


def test_ratios_carry_the_spread_and_an_unmeasured_recipe_gives_none():
    # The runs: published 157.8/161.3 s, the seed's command on this build 123.1/132.2 s, the full
    # script 116.9/116.7 s.
    r = tune_published.ratio([157.8, 161.3], [116.9, 116.7])
    assert r["ratio"] == pytest.approx(159.55 / 116.8) and r["min"] == pytest.approx(157.8 / 116.9)
    assert r["max"] == pytest.approx(161.3 / 116.7)
    assert tables.format_ratio_range(r) == "1.37× (1.35–1.38)"
    row = {"status": "ok", "config": "p", "answer_s": 159.55, "answer_min_s": 157.8, "answer_max_s": 161.3, "runs": 2,
           "answer_s_all": [157.8, 161.3], "image_tokens": 2880}
    chosen = {"full": {"answer_s_all": [116.9, 116.7]}, "single": {"answer_s_all": [56.4, 48.6]}}
    s = tune_published.summary(row, None, Path("cli"), chosen, {"answer_s_all": [123.1, 132.2]})
    assert s["measured"] and s["image_tokens"] == 2880
    assert s["ratios"]["single"]["vs_published"]["ratio"] == pytest.approx(159.55 / 52.5)
    assert s["ratios"]["full"]["vs_same_build"]["ratio"] == pytest.approx(127.65 / 116.8)
    assert s["same_build_vs_published"]["ratio"] == pytest.approx(159.55 / 127.65)
    absent = tune_published.summary(None, "not measured: tune.published_baseline is off", None, chosen, None)
    assert not absent["measured"] and absent["ratios"]["full"] == {"vs_published": None, "vs_same_build": None}
    failed = tune_published.summary({"status": "failed", "error": "llama-mtmd-cli crashed (SIGSEGV)\n..."}, None,
                                    Path("cli"), chosen, None)
    assert failed["why_not"] == "not measured: its runs failed (llama-mtmd-cli crashed (SIGSEGV))"


def test_low_bit_types_get_the_importance_matrix_variant():
    assert [q for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_1", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0", "Q2_K", "F16")
            if tune_quality.low_bit(q)] == ["Q4_1", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0", "Q2_K"]


def test_a_failed_kld_run_leaves_the_types_unmeasured_and_a_bug_is_not_hidden(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from llava_gguf.checks import quality
    from llava_gguf.llama_cpp import toolchain

    ref = tmp_path / "m-F16.gguf"
    monkeypatch.setattr(tune_quality, "reference", lambda run, files: ("F16", ref))
    run = SimpleNamespace(params=SimpleNamespace(evaluate=SimpleNamespace(perplexity=True)))
    files = {"Q4_0": tmp_path / "m-Q4_0.gguf"}

    def failed(*a, **kw):
        raise toolchain.ToolFailed("llama-perplexity exited with status 1", None)
    monkeypatch.setattr(quality, "kld_table", failed)
    assert tune_quality.missing_kld(run, files, {}) == {}

    def bug(*a, **kw):
        raise KeyError("kld")
    monkeypatch.setattr(quality, "kld_table", bug)
    with pytest.raises(KeyError):
        tune_quality.missing_kld(run, files, {})


def test_no_quant_type_is_the_tune_steps_error_naming_the_keys(tmp_path):
    from types import SimpleNamespace

    from llava_gguf.tune.config import TuneError

    run = SimpleNamespace(dir=tmp_path, artifacts=lambda: {}, resolve=lambda p: p)  # no step 06 metrics
    with pytest.raises(TuneError, match=r"tune\.quant_types.*quantize\.types"):
        tune_quality.quality_inputs(run, [], 0.05)


def test_prepare_files_reuses_the_runs_files_and_quantizes_the_rest(tmp_path, monkeypatch):
    """Step 05's quantize_file makes what the run lacks (a simulated one here), repacked and small types first;
    a type that cannot be made says why; without an unquantized export nothing can be made."""
    from types import SimpleNamespace

    from llava_gguf.run import diskspace
    from llava_gguf.steps import quantize

    made = []

    def fake_quantize(run, text_gguf, qtype, imatrix=None, force=False, out=None):
        if qtype == "Q8_0":
            raise diskspace.DiskFullError("not enough free disk for the Q8_0 file")
        made.append(qtype)
        return tmp_path / f"m-{qtype}.gguf", qtype == "Q4_0"  # Q4_0: an earlier tune's file, reused

    monkeypatch.setattr(quantize, "quantize_file", fake_quantize)
    params = SimpleNamespace(quantize=SimpleNamespace(imatrix=False))
    run = SimpleNamespace(params=params, artifacts=lambda: {"text_gguf": "t.gguf"},
                          artifact_path=lambda name: tmp_path / "m-F16.gguf")
    screens = [tune_screen.TypeScreen("Q8_0", "t", repacked_expected=False),
               tune_screen.TypeScreen("Q5_K_M", "t", repacked_expected=False),
               tune_screen.TypeScreen("Q4_K_M", "t", repacked_expected=True),
               tune_screen.TypeScreen("Q4_0", "t", repacked_expected=True)]
    files = tune_screen.prepare_files(run, screens, {"Q5_K_M": tmp_path / "run-Q5_K_M.gguf"})
    assert made == ["Q4_0", "Q4_K_M"]  # Q8_0 (not repacked here, the largest) last, and it failed
    assert files == {"Q5_K_M": tmp_path / "run-Q5_K_M.gguf", "Q4_0": tmp_path / "m-Q4_0.gguf",
                     "Q4_K_M": tmp_path / "m-Q4_K_M.gguf"}
    assert [(s.quant, s.source) for s in screens] == [("Q8_0", None), ("Q5_K_M", "run"), ("Q4_K_M", "quantized"),
                                                      ("Q4_0", "reused")]
    assert screens[0].status == "screened out" and screens[0].reason.startswith("not quantized: not enough free disk")
    ready = SimpleNamespace(params=params, artifacts=lambda: {"quantized": {}})
    lone = [tune_screen.TypeScreen("Q4_0", "t")]
    assert tune_screen.prepare_files(ready, lone, {}) == {} and "model.format gguf" in lone[0].reason


def test_report_tables_from_recommended_json():
    from llava_gguf.reports import tune_tables

    pub = tune_published.summary({"status": "ok", "config": "p", "answer_s": 159.6, "answer_min_s": 157.8,
                                  "answer_max_s": 161.3, "runs": 2, "answer_s_all": [157.8, 161.3],
                                  "image_tokens": 2880}, None, Path("cli"),
                                 {"full": {"answer_s_all": [116.9, 116.7]}}, {"answer_s_all": [123.1, 132.2]})
    rec = {"published": pub, "baseline": {"config": "Q5_K_M, mmproj f16, budget full", "answer_s": 127.6,
                                          "answer_min_s": 123.1, "answer_max_s": 132.2, "runs": 2, "image_tokens": 2340},
           "budgets": {"full": {"config": "Q5_K_M, t 2", "answer_s": 116.8, "answer_min_s": 116.7, "answer_max_s": 116.9,
                                "runs": 1, "image_tokens": 2340}},
           "coverage": [{"quant": "Q4_0", "budget": "full", "answer_s": None, "why_not": "dominated by Q4_K_M: faster"},
                        {"quant": "Q5_K_M", "budget": "full", "answer_s": 130.0, "why_not": None}],
           "bound": {"full": {"config": "Q5_K_M, t 2", "prefill": {"text": "prefill at 93% of this CPU's ceiling"},
                              "generation": {"text": "generation at 61% of memory bandwidth"},
                              "bandwidth": {"GB_per_s": 10.0, "method": "numpy copy"}}}}
    table = tune_tables.baselines_table(rec).set_index("what")
    assert table.loc["the published recipe", "answer"] == "159.60 s (157.80–161.30, 2 runs)"
    assert table.loc["recommended, budget full", "faster than the published recipe"] == "1.37× (1.35–1.38)"
    assert table.loc["recommended, budget full", "answer"].endswith("1 run)")
    assert table.loc["the seed's command, this build", "faster than the published recipe"] == "1.25× (1.19–1.31)"
    cov = tune_tables.coverage_table(rec)
    assert cov.loc["Q4_0", "full"] == "— dominated by Q4_K_M" and cov.loc["Q5_K_M", "full"] == "130.00 s"
    lines = tune_tables.bound_lines(rec)
    assert lines[0] == ("**full** (Q5_K_M, t 2): prefill at 93% of this CPU's ceiling; "
                        "generation at 61% of memory bandwidth") and lines[1].startswith("copy bandwidth: 10")
    absent = tune_published.summary(None, "not measured: tune.published_baseline is off", None, {}, None)
    assert tune_tables.baselines_table({**rec, "published": absent}).iloc[0]["answer"] == absent["why_not"]
