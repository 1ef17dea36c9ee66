"""Step 07: the significance rule, the staged search, failing configurations, mmproj budget variants,
run-llava.sh as the measured command and a tiny end-to-end run (overrides: tests/test_flags.py)."""
from __future__ import annotations

import html
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from llava_gguf.tune import mmproj_variants, config as tune_config, results as tune_results
from llava_gguf.reports import plots
from llava_gguf.steps import tune
from llava_gguf.llama_cpp import flags
from llava_gguf.llama_cpp.mtmd import EvaluationError, MtmdOptions
from llava_gguf.model.gguf_io import read_gguf
from llava_gguf.run.params import EvaluateParams, TuneParams

# Answer times (s) recorded on this project's 2-core machine: llama-mtmd-cli on the tiny model,
# three confirmation runs per configuration (a loaded, shared machine: note the spread).
RECORDED = {
    "seed": [2.91, 3.40, 3.05],
    "t2-fa-on": [2.20, 2.31, 2.47],
    "t1": [2.85, 3.62, 3.10],
    "single": [0.88, 0.93, 1.41],
}


# ----------------------------------------------------------------------------- statistics
def test_compare_needs_disjoint_ranges():
    assert tune_config.compare(RECORDED["t2-fa-on"], RECORDED["seed"]) == "faster"
    assert tune_config.compare(RECORDED["seed"], RECORDED["t2-fa-on"]) == "slower"
    # Medians differ (3.05 vs 3.10) but the ranges overlap: no claim either way.
    assert tune_config.compare(RECORDED["seed"], RECORDED["t1"]) == tune_config.compare(RECORDED["t1"], RECORDED["seed"]) == "same"
    # One slow outlier (1.41 s) still below the other's fastest run: faster.
    assert tune_config.compare(RECORDED["single"], RECORDED["t2-fa-on"]) == "faster"
    # Fewer than two runs on a side says nothing about the spread: no claim (winner.py).
    assert tune_config.compare([], RECORDED["seed"]) == tune_config.compare([2.0], RECORDED["seed"]) == "no claim"


def test_spread_of_recorded_runs():
    s = tune_config.spread(RECORDED["seed"])
    assert s["median"] == 3.05 and s["min"] == 2.91 and s["max"] == 3.40 and s["n"] == 3
    assert s["rel_range"] == pytest.approx((3.40 - 2.91) / 3.05)
    assert tune_config.spread([None, float("nan")])["median"] is None


def test_answer_seconds_normalises_to_n_predict():
    row = {"ttft_ms": 1500.0, "eval_ms_per_token": 100.0}
    assert tune_config.answer_seconds(row, 11) == pytest.approx(2.5)
    # An early end-of-generation does not make a run look faster: per-token time x the full length.
    assert tune_config.answer_seconds({"ttft_ms": 1500.0, "eval_ms_per_token": None, "itl_median_ms": 100.0}, 11) == 2.5
    assert tune_config.answer_seconds({"ttft_ms": None}, 11) is None


def test_pareto_front():
    pts = [(3.0, 0.0), (2.0, 0.01), (2.5, 0.02), (1.0, 0.05), (1.5, 0.05)]
    assert plots.pareto_front(pts) == [3, 1, 0]


def test_default_threads_and_runtime_grid():
    assert tune_config.default_threads(2) == [1, 2]
    assert tune_config.default_threads(16) == [1, 2, 4, 8, 16]
    assert tune_config.default_threads(12) == [1, 2, 4, 8, 12]
    grid, skipped = tune_config.runtime_grid(tune_config.Config("Q4_0"), ["on", "off"], ["f16", "q8_0"], [None])
    assert {(c.flash_attn, c.cache_type) for c in grid} == {("on", "f16"), ("on", "q8_0"), ("off", "f16")}
    assert [(c.flash_attn, c.cache_type) for c, _ in skipped] == [("off", "q8_0")]


def test_baseline_is_the_seed_command():
    assert tune_config.baseline_config(["Q8_0", "Q5_K_M", "Q4_K_M"]) == tune_config.Config("Q5_K_M")
    assert tune_config.baseline_config(["Q8_0", "Q4_K_M"]).quant == "Q8_0"
    # The seed's command: every setting tune decides at the tool's default, each one a flag-table row.
    settings = tune_config.Config("Q5_K_M").settings()
    assert set(settings.values()) == {None} and set(settings) <= set(flags.BY_KEY)
    assert {"threads", "threads_batch", "cpu_mask", "cpu_mask_batch", "cpu_strict", "flash_attn", "cache_type_k",
            "cache_type_v", "ubatch_size"} <= set(settings)
    with pytest.raises(tune_config.TuneError):
        tune_config.baseline_config([])


# ----------------------------------------------------------------------------- the search (simulated tool)
@dataclass
class FakeRun:
    """What run_mtmd returns, as far as the tuner reads it."""

    ttft_ms: float
    ms_per_token: float
    image_tokens: int
    command: list = field(default_factory=list)
    under_load: bool | None = None

    def summary(self):
        return {"answer": "a cat", "ttft_ms": self.ttft_ms, "eval_ms_per_token": self.ms_per_token,
                "image_tokens": self.image_tokens, "image_encode_ms": 100.0, "prompt_eval_ms": self.ttft_ms - 300,
                "load_ms": 200.0, "eval_ms": self.ms_per_token * 3, "under_load": self.under_load,
                "loadavg_start": 1.5, "others_cores": 0.9 if self.under_load else 0.02, "steal_pct": 0.0}


def simulated_tool(calls: list):
    """A machine where 2 threads, Q4_K_M, flash attention and fewer image tokens are faster; Q4_0 fails."""
    tokens = {"full": 2880, "wide-tall": 1728, "single": 576}

    def runner(cli, text, mmproj, image, prompt, opts: MtmdOptions, log_path):
        e = opts.evaluate
        calls.append((Path(text).name, Path(mmproj).name, e.threads, e.flash_attn, e.cache_type_k, e.n_predict))
        if "Q4_0" in str(text) or "--bogus" in opts.extra_args:
            raise EvaluationError(f"llama-mtmd-cli failed (exit status 1); full log kept at {log_path}. "
                                  "error: invalid argument")
        budget = Path(mmproj).stem.split("-")[-1] if "-" in Path(mmproj).stem else "full"
        budget = {"tall": "wide-tall"}.get(budget, budget)
        prefill = tokens.get(budget, 2880) / (20.0 if e.threads == 2 else 12.0)
        prefill *= 0.8 if e.flash_attn == "on" else 1.0
        per_tok = {"Q4_K_M": 90.0, "Q5_K_M": 110.0, "Q8_0": 150.0}.get(Path(text).stem, 120.0)
        return FakeRun(1000.0 * prefill / 100.0 + 300.0, per_tok, tokens.get(budget, 2880))
    return runner


def _measurer(tmp_path, calls, types=("Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0")):
    text = {q: tmp_path / f"{q}.gguf" for q in types}
    mmproj = {(t, b): tmp_path / (f"mmproj-{t}.gguf" if b == "full" else f"mmproj-{t}-{b}.gguf")
              for t in ("f16", "q8_0") for b in ("full", "wide-tall", "single")}
    return tune.Measurer(Path("llama-mtmd-cli"), text, mmproj, tmp_path / "img.jpg", "Describe.",
                         MtmdOptions(EvaluateParams(n_predict=8)), tmp_path / "logs", runner=simulated_tool(calls))


def test_staged_search_finds_the_fastest_and_skips_failures(tmp_path):
    calls = []
    m = _measurer(tmp_path, calls)
    p = TuneParams(threads=[1, 2], ubatch_size=[None])
    base = tune_config.Config("Q5_K_M")
    types = ["Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"]
    per_budget, skipped = tune.screen(m, base, p, types, allowed=set(types) - {"Q8_0"}, n_predict=4,
                                      budget_s=float("inf"))
    best_full = per_budget["full"][0]
    assert (best_full["threads"], best_full["quant"], best_full["flash_attn"]) == (2, "Q4_K_M", "on")
    assert per_budget["single"][0]["answer_s"] < per_budget["wide-tall"][0]["answer_s"] < best_full["answer_s"]
    # Q4_0 failed: recorded with its error, not fatal, and never retried.
    failed = [r for r in m.rows if r["status"] == "failed"]
    assert [r["quant"] for r in failed] == ["Q4_0"] and "invalid argument" in failed[0]["error"]
    assert sum(1 for c in calls if c[0] == "Q4_0.gguf") == 1
    n_calls = len(calls)
    assert m.measure(tune_config.config_from_row(failed[0]), "again", 4) is None and len(calls) == n_calls
    # Q8_0 is over the KLD budget: never run, listed as skipped with why.
    assert not any(c[0] == "Q8_0.gguf" for c in calls)
    whys = {s["why"] for s in skipped}
    assert "KL divergence over tune.kld_budget" in whys and "a quantized V cache needs flash attention" in whys
    assert all(c[-1] == 4 for c in calls)  # screening runs are short


def test_smaller_budgets_try_the_quant_types_again(tmp_path):
    """Q5_K_M prefills faster and Q4_K_M generates faster (as Q5_K_M and Q4_0 did at 7B here): the
    full budget is prefill-bound and the single view generation-bound, so each gets its own type."""
    calls = []
    tokens = {"full": 2340, "single": 576}

    def runner(cli, text, mmproj, image, prompt, opts, log_path):
        quant, budget = Path(text).stem, "single" if "single" in Path(mmproj).stem else "full"
        calls.append((quant, budget))
        prefill_ms, gen_ms = {"Q5_K_M": (40.0, 350.0), "Q4_K_M": (60.0, 200.0)}[quant]
        return FakeRun(prefill_ms * tokens[budget], gen_ms, tokens[budget])

    m = _measurer(tmp_path, calls, types=("Q5_K_M", "Q4_K_M"))
    m.runner = runner
    p = TuneParams(threads=[2], flash_attn=["off"], cache_type=["f16"], ubatch_size=[None], mmproj_types=["f16"],
                   image_budgets={"full": None, "single": []})
    per_budget, _ = tune.screen(m, tune_config.Config("Q5_K_M"), p, ["Q5_K_M", "Q4_K_M"], {"Q5_K_M", "Q4_K_M"},
                                n_predict=4, budget_s=float("inf"), answer_tokens=135)
    assert per_budget["full"][0]["quant"] == "Q5_K_M" and per_budget["single"][0]["quant"] == "Q4_K_M"
    assert ("Q4_K_M", "single") in calls and ("Q5_K_M", "single") in calls


def test_search_respects_the_time_budget(tmp_path):
    calls = []
    m = _measurer(tmp_path, calls)
    per_budget, skipped = tune.screen(m, tune_config.Config("Q5_K_M"), TuneParams(threads=[1, 2]), ["Q5_K_M"], {"Q5_K_M"},
                                      n_predict=4, budget_s=0.0)
    # Past the deadline only each smaller budget's one run is made, at the seed's settings: every
    # budget needs a recommendation (under qemu a 5-minute budget once left two budgets unmeasured).
    assert [(c[1], c[2]) for c in calls] == [("mmproj-f16-wide-tall.gguf", None), ("mmproj-f16-single.gguf", None)]
    assert {b: [r["config"] for r in rows] for b, rows in per_budget.items()} == {
        "full": [], "wide-tall": [tune_config.Config("Q5_K_M", budget="wide-tall").label],
        "single": [tune_config.Config("Q5_K_M", budget="single").label]}
    over = [s for s in skipped if "budget_minutes" in s["why"]]
    assert len(over) == 2 + (8 - 2) + 3  # threads, runtime grid minus the 2 pruned, the q8_0 mmproj at each budget
    assert {s["budget"] for s in over if s.get("budget") != "full"} == {"wide-tall", "single"}


def test_the_time_budget_counts_from_the_first_screening_run(tmp_path):
    """At 7B the type screen before the screening (quantizing, KLD, llama-bench) outlasts
    tune.budget_minutes; the budget is the screening's own, however late it starts."""
    calls = []
    m = _measurer(tmp_path, calls)
    _, skipped = tune.screen(m, tune_config.Config("Q5_K_M"), TuneParams(threads=[1, 2]), ["Q5_K_M", "Q4_K_M"],
                             {"Q5_K_M", "Q4_K_M"}, n_predict=4, budget_s=60.0)
    assert not [s for s in skipped if "budget_minutes" in s["why"]]
    assert ("Q4_K_M.gguf", "mmproj-f16.gguf") in {c[:2] for c in calls}


def test_confirm_and_choose_apply_the_rule(tmp_path):
    calls = []
    m = _measurer(tmp_path, calls)
    base, fast, bad = tune_config.Config("Q5_K_M"), tune_config.Config("Q4_K_M", threads=2, flash_attn="on"), \
        tune_config.Config("Q5_K_M", extra_args=("--bogus",))
    confirmed = tune.confirm(m, [base, fast, bad], repetitions=3, n_predict=8)
    ok = confirmed.set_index("config")
    assert ok.loc[base.label, "runs"] == 3 and ok.loc[bad.label, "status"] == "failed"
    # warm-up + 3 runs for each working configuration, one failed attempt for the broken one
    assert sum(1 for r in m.rows if r["phase"] == "warmup" and r["status"] == "ok") == 2 and len(calls) == 9
    chosen = tune.choose(confirmed, base)
    assert chosen["full"]["config"] == fast.label and chosen["full"]["vs_baseline"] == "faster"


def test_confirmation_runs_under_load_are_run_again_a_bounded_number_of_times(tmp_path, caplog):
    """A confirmation run under load is dropped and run again, at most tune.load_retries times per
    configuration; one still under load after that is kept, counted and marked (machine_load.py)."""
    from llava_gguf.run import machine_load as load

    flags_seq = iter([True, True, False, True, True])  # warm-up, rep 1 (+ rerun), rep 2 (+ rerun)
    calls = []
    m = _measurer(tmp_path, calls)
    m.runner = lambda cli, text, mmproj, image, prompt, opts, log_path: (
        calls.append(log_path) or FakeRun(500.0, 100.0, 576, under_load=next(flags_seq)))
    base = tune_config.Config("Q5_K_M")
    with caplog.at_level("INFO"):
        confirmed = tune.confirm(m, [base], repetitions=2, n_predict=8, load_retries=2)
    assert [r["phase"] for r in m.rows] == ["warmup", load.DROPPED, "confirm", load.DROPPED, "confirm"]
    assert len(set(calls)) == 5  # every run has its own log, the dropped ones' included
    row = confirmed.iloc[0]
    assert (row["runs"], row["runs_under_load"], row["reruns"]) == (2, 1, 2)
    assert load.loaded(row) and row["others_cores"] == pytest.approx((0.02 + 0.9) / 2)
    note = load.retry_note(m.rows, 2)
    assert note.startswith("2 confirmation runs taken under load dropped and run again; 1 run still under load")
    assert note in caplog.text and "dropped and run again" in caplog.text
    # No retries allowed: the loaded runs are kept (and marked), none is repeated.
    flags_seq = iter([False, True, True])
    m = _measurer(tmp_path, calls)
    m.runner = lambda *a: FakeRun(500.0, 100.0, 576, under_load=next(flags_seq))
    row = tune.confirm(m, [base], repetitions=2, n_predict=8).iloc[0]
    assert len(m.rows) == 3 and (row["runs_under_load"], row["reruns"]) == (2, 0)


def test_choose_prefers_the_precise_one_within_the_spread():
    import pandas as pd

    def row(cfg, runs):
        return {"config": cfg.label, **cfg.__dict__, "status": "ok", "answer_s": sorted(runs)[1], "answer_s_all": runs}
    base = tune_config.Config("Q5_K_M")
    q8 = tune_config.Config("Q5_K_M", mmproj="q8_0", budget="single", threads=1)
    f16 = tune_config.Config("Q5_K_M", budget="single", threads=1)
    q4 = tune_config.Config("Q4_K_M", budget="single", threads=1)
    # Recorded confirmation runs of the tiny model (single budget): q8_0's median is lower, the ranges overlap.
    confirmed = pd.DataFrame([row(base, RECORDED["seed"]), row(q8, [0.50, 0.53, 0.79]), row(f16, [0.55, 0.55, 0.57]),
                              row(q4, [0.40, 0.42, 0.44])])
    chosen = tune.choose(confirmed, base, {"Q5_K_M": 0.005, "Q4_K_M": 0.02})
    assert chosen["full"]["config"] == base.label and chosen["full"]["vs_baseline"] == "same"
    # Q4_K_M beats both beyond the spread, so its higher KLD (within the budget) does not matter.
    assert chosen["single"]["config"] == q4.label and chosen["single"]["vs_baseline"] == "faster"
    confirmed = confirmed[confirmed["quant"] != "Q4_K_M"]
    assert tune.choose(confirmed, base)["single"]["config"] == f16.label


# ----------------------------------------------------------------------------- the script
def test_script_runs_what_measure_runs(tmp_path):
    """run-llava.sh is rendered from the settings `Measurer.measure` runs with: same argv, greedy, -n."""
    echo = tmp_path / "llama-mtmd-cli"
    echo.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    echo.chmod(0o755)
    calls = []
    m = _measurer(tmp_path, calls)
    m.cli = echo
    seen = []
    m.runner = lambda cli, text, mmproj, image, prompt, opts, log_path: (
        seen.append(opts.command(cli, text, mmproj, image, prompt)) or FakeRun(500.0, 100.0, 576, seen[-1]))
    cfg = tune_config.Config("Q4_K_M", budget="single", threads=2, cpu_mask="0x3", cpu_strict=1, flash_attn="on",
                             cache_type="q8_0")
    row = m.measure(cfg, "confirm", 8)
    script = tmp_path / "run-llava-single.sh"
    script.write_text(tune_results.script_text(m, cfg, 8, ["header"], script.name))
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    assert [str(echo), *out.stdout.splitlines()] == row["command"] == flags.executed_argv(out.stderr, script.name)
    pairs = dict(zip(row["command"][1::2], row["command"][2::2]))
    assert (pairs["--temp"], pairs["--seed"], pairs["-n"], pairs["-t"], pairs["-tb"], pairs["-C"],
            pairs["--cpu-strict"], pairs["--chat-template"]) == ("0.0", "42", "8", "2", "2", "0x3", "1", "vicuna")
    assert pairs["--mmproj"].endswith("mmproj-f16-single.gguf") and pairs["--image"] == str(tmp_path / "img.jpg")
    assert "llama-server" in script.read_text() and "--image" not in script.read_text().split("llama-server")[1]


# ----------------------------------------------------------------------------- with llama.cpp
def test_mmproj_variant_changes_only_its_key(tiny_ggufs, tmp_path):
    src = read_gguf(tiny_ggufs["mmproj"])
    assert mmproj_variants.PINPOINTS_KEY in src.fields
    single = read_gguf(mmproj_variants.mmproj_variant(tiny_ggufs["mmproj"], tmp_path / "single.gguf", []))
    two = read_gguf(mmproj_variants.mmproj_variant(tiny_ggufs["mmproj"], tmp_path / "two.gguf", [[672, 336], [336, 672]]))
    assert mmproj_variants.PINPOINTS_KEY not in single.fields and two.fields[mmproj_variants.PINPOINTS_KEY] == [672, 336, 336, 672]
    for g in (single, two):
        assert {k: v for k, v in g.fields.items() if k != mmproj_variants.PINPOINTS_KEY} == \
            {k: v for k, v in src.fields.items() if k != mmproj_variants.PINPOINTS_KEY}
        assert [(t.name, t.qtype, t.shape) for t in g.tensors.values()] == \
            [(t.name, t.qtype, t.shape) for t in src.tensors.values()]
        assert all(bytes(g.tensors[n].data) == bytes(t.data) for n, t in src.tensors.items())


def test_q8_mmproj_quantizes_the_matrices(tiny_ggufs, tmp_path, caplog):
    import gguf

    src = read_gguf(tiny_ggufs["mmproj"])
    q8 = read_gguf(mmproj_variants.mmproj_variant(tiny_ggufs["mmproj"], tmp_path / "q8.gguf", None, "q8_0"))
    assert q8.fields[mmproj_variants.PINPOINTS_KEY] == src.fields[mmproj_variants.PINPOINTS_KEY]
    if "general.file_type" in src.fields:  # restated once, not written twice (gguf-py warns and overwrites)
        assert q8.fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
        assert "Duplicated key" not in caplog.text
    changed = {n for n, t in q8.tensors.items() if t.qtype != src.tensors[n].qtype}
    assert changed and all(q8.tensors[n].qtype == gguf.GGMLQuantizationType.Q8_0 for n in changed)
    assert all(".attn_" in n or ".ffn_" in n or n.startswith("mm.") for n in changed), changed
    assert not any("patch_embd" in n or "position_embd" in n for n in changed)
    for n in list(changed)[:3]:
        ref = src.tensors[n].values()
        err = float(((q8.tensors[n].values() - ref) ** 2).sum() / (ref ** 2).sum())
        assert 0 < err < 1e-3, (n, err)
    assert q8.path.stat().st_size < src.path.stat().st_size


@pytest.mark.llama_cpp
def test_budget_token_counts_from_the_log(tiny_ggufs, llama_tool, tmp_path):
    from llava_gguf.llama_cpp import toolchain
    from llava_gguf.llama_cpp.mtmd import DEFAULT_IMAGE, run_mtmd

    cli = llama_tool("llama-mtmd-cli")
    image = toolchain.source_asset(DEFAULT_IMAGE)
    info = read_gguf(tiny_ggufs["mmproj"]).fields
    per_view = (info["clip.vision.image_size"] // info["clip.vision.patch_size"]) ** 2
    tokens = {}
    for name, pins in {"full": None, "wide-tall": [[672, 336], [336, 672]], "single": []}.items():
        mm = mmproj_variants.mmproj_variant(tiny_ggufs["mmproj"], tmp_path / f"{name}.gguf", pins)
        r = run_mtmd(cli, tiny_ggufs["text"], mm, image, "Describe this image.",
                     MtmdOptions(EvaluateParams(n_predict=2, threads=2)), tmp_path / f"{name}.log")
        tokens[name] = r.timings.image_tokens
    assert tokens["single"] == per_view  # no pinpoints: one image_size view
    assert tokens["single"] < tokens["wide-tall"] < tokens["full"]


@pytest.mark.llama_cpp
def test_tune_step_end_to_end(write_params, llama_tool):
    from llava_gguf.pipeline import runner as pipeline
    from llava_gguf.run import workspace

    llama_tool("llama-mtmd-cli")
    run = workspace.open_run(write_params({
        "run": "tune-e2e", "model": {"source": "tiny"}, "quantize": {"types": ["Q4_K_M", "Q5_K_M"]},
        "evaluate": {"n_predict": 6, "threads": 2, "cases": [{"prompt": "Describe this image."}],
                     "board": "Test Board 1"},
        "tune": {"threads": [2], "flash_attn": ["on"], "cache_type": ["f16"], "ubatch_size": [None],
                 "repetitions": 2, "finalists": 1, "screen_n_predict": 2,
                 "image_budgets": {"full": None, "single": []},
                 # Q4_0 and IQ4_NL are not step 05's: tune makes them and measures their KLD itself.
                 "quant_types": ["Q5_K_M", "Q4_K_M", "IQ4_NL", "Q4_0"], "bench_prompt": 16, "bench_gen": 4,
                 "bench_repetitions": 2, "published_baseline": "if-built"}}))
    stale = run.sub("tune") / "logs" / "000-screen-baseline-from-an-earlier-tune.log"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("an earlier tune's log\n")
    done = pipeline.run_steps(run, ["tune"])
    assert done[-1] == ("tune", "ran")
    assert not stale.exists()  # tune/logs holds this run's logs only
    rec = json.loads(run.resolve(run.artifacts()["tune"]["recommended"]).read_text())
    assert rec["baseline"]["config"].startswith("Q5_K_M, mmproj f16, budget full") and rec["baseline"]["runs"] == 2
    assert set(rec["budgets"]) == {"full", "single"}
    assert rec["budgets"]["single"]["image_tokens"] < rec["budgets"]["full"]["image_tokens"]
    assert rec["notes"] and "carries no meaning" in rec["notes"][0]
    assert rec["quality"]["mmproj_nmse"]["q8_0"] > 0
    for name in ("run-llava.sh", "run-llava-full.sh", "run-llava-single.sh"):
        assert (run.dir / name).stat().st_mode & 0o111
    # The board is the name the user gave, never the host name, in every file a user may publish.
    import socket

    assert rec["setup"]["machine"]["board"] == "Test Board 1" and "Test Board 1" in (run.dir / "run-llava.sh").read_text()
    host = socket.gethostname()
    for path in [*run.dir.glob("*.sh"), *run.dir.rglob("*.json"), *(run.dir / "reports").glob("*.html")]:
        assert len(host) < 4 or host not in path.read_text(errors="replace"), path
    # Run bare, each script runs the measured command (greedy, its -n) on the image in the run folder,
    # gives the measured answer and exits 0 (it used to sample until the context was full, then exit 1).
    for budget, name in (("full", "run-llava.sh"), ("single", "run-llava-single.sh")):
        measured = rec["budgets"][budget]
        out = subprocess.run([str(run.dir / name)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        argv = flags.executed_argv(out.stderr, name)
        assert argv == measured["command"] and argv[argv.index("-n") + 1] == "6" and "--temp" in argv
        assert Path(argv[argv.index("--image") + 1]).parent == run.dir / "tune"
        assert out.stdout.strip() == measured["answer"]
    # serve-llava*.sh beside them: llama-server on the same files and flags (llama_cpp/server.py; started
    # and stopped in tests/test_server.py), without the fixed answer length and the log level.
    for budget, name in (("full", "serve-llava.sh"), ("full", "serve-llava-full.sh"), ("single", "serve-llava-single.sh")):
        text = (run.dir / name).read_text()
        assert (run.dir / name).stat().st_mode & 0o111
        for option, value in (("-m", rec["budgets"][budget]["text_gguf"]), ("--mmproj", rec["budgets"][budget]["mmproj"]),
                              ("--host", "127.0.0.1")):
            assert f"cmd+=({option} {shlex.quote(value)})" in text, (name, option)
        # The measured `--chat-template vicuna` is the GGUF's own Vicuna template, with Jinja (server.py).
        assert "cmd+=(--jinja)" in text and "--chat-template" not in text
        assert "cmd+=(-n " not in text and "cmd+=(-lv " not in text
    out = subprocess.run(["bash", str(run.dir / "run-llava-single.sh"), "-n", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert flags.executed_argv(out.stderr, "run-llava-single.sh").count("-n") == 1
    index = (run.dir / "reports" / "index.html").read_text()
    assert re.search(r"(faster than|slower than|same speed as) the seed&#x27;s command( on this build)? \(", index), index[:2000]
    assert "(1-min average)" in index and "Fastest quant type in evaluate" in index
    _check_the_type_screen(run, rec)
    assert (run.dir / "plots" / "tune_latency.png").exists() and (run.dir / "plots" / "tune_pareto.png").exists()
    import yaml

    snippet = yaml.safe_load((run.dir / "tune" / "params-snippet.yaml").read_text())["evaluate"]
    settings = rec["recommended"]["settings"]
    assert snippet["threads"] == settings["threads"] and snippet["flash_attn"] == settings["flash_attn"]
    assert snippet["chat_template"] == "vicuna" and "cache_type_k" in snippet


def _check_the_type_screen(run, rec):
    """The llama-bench screen, every type at every budget, both baselines and the bound (issue 20)."""
    from llava_gguf.tune import quant_candidates, published as tune_published

    types = {t["quant"]: t for t in rec["types"]["types"]}
    assert list(types) == ["Q5_K_M", "Q4_K_M", "IQ4_NL", "Q4_0"]
    assert types["Q4_0"]["source"] in ("quantized", "reused", "tune, with imatrix")
    assert types["Q4_K_M"]["source"] in ("run", "tune, with imatrix") and types["Q5_K_M"]["source"] == "run"
    # The 4-bit types with and without the importance matrix: both KLDs, the lower one used.
    for q in ("Q4_K_M", "IQ4_NL", "Q4_0"):
        t = types[q]
        assert t["kld"] == min(t["kld_plain"], t["kld_imatrix"]) and t["imatrix"] == (t["kld_imatrix"] < t["kld_plain"])
    assert types["Q5_K_M"]["kld_imatrix"] is None
    assert any((run.dir / "models").glob("*-Q4_0*.gguf"))
    expected = quant_candidates.this_cpu().repacked_ggml_types()
    for q, main in (("Q5_K_M", "q5_K"), ("Q4_K_M", "q4_K"), ("IQ4_NL", "iq4_nl"), ("Q4_0", "q4_0")):
        t = types[q]
        assert t["pp_tokens_per_s"] > 0 and t["tg_tokens_per_s"] > 0 and t["pp_test"] == "pp16", t
        assert t["kld"] is not None  # step 06 did not run: tune measured every type's KLD
        # Repacked is read from the load log, and on this CPU it is what the table expects.
        assert (main in (t["repacked_types"] or "")) == (main in expected), t
        assert Path(t["bench_log"]).exists()
        if t["status"] != "kept":
            assert t["reason"], t
    # Every type has a screened answer at every budget, or a reason.
    cov = rec["coverage"]
    assert {(c["quant"], c["budget"]) for c in cov} == {(q, b) for q in types for b in ("full", "single")}
    assert all(c["answer_s"] is not None or c["why_not"] for c in cov)
    assert all(c["answer_s"] is not None for c in cov if types[c["quant"]]["status"] == "kept")
    ceiling = rec["types"]["ceiling"]
    assert ceiling["tokens_per_s"] == max(t["pp_tokens_per_s"] for t in types.values())
    for b in ("full", "single"):
        bound = rec["bound"][b]
        assert bound["prefill"]["text"].startswith("prefill at ") and "% of this CPU's ceiling" in bound["prefill"]["text"]
        assert bound["generation"]["text"].startswith("generation at ") and "% of memory bandwidth" in bound["generation"]["text"]
    pub = rec["published"]
    page = (run.dir / "reports" / "index.html").read_text()
    if tune_published.unpatched_cli().exists():
        assert pub["measured"] and pub["runs"] == 2 and pub["ratios"]["full"]["vs_published"]["ratio"] > 0, pub
        # The tiny model runs about as fast on either build: any verdict, named, with its description.
        described = re.escape(html.escape(f"the published recipe ({tune_published.DESCRIPTION}"))
        assert re.search(rf"(faster than|slower than|same speed as) {described}", page), page[:3000]
        # The unpatched build feeds LLaVA 1.6 the flat sequence: more image tokens than the faithful one.
        assert pub["image_tokens"] > rec["baseline"]["image_tokens"]
    else:
        assert not pub["measured"] and "make llama-cpp-unpatched" in pub["why_not"]
        assert "the published recipe: not measured" in page


def test_config_survives_the_tables_round_trip(tmp_path):
    """The step's own tables (`confirm`: None and int columns mixed, a failed row) and `choose`'s rows
    give back the configurations they were made of."""
    cfgs = [tune_config.Config("Q4_K_M", threads=2, ubatch_size=256, flash_attn="on"), tune_config.Config("Q5_K_M"),
            tune_config.Config("Q5_K_M", threads=4, threads_batch=8, cpu_mask="0xf0", cpu_mask_batch="0xff0",
                               cpu_strict=1),
            tune_config.Config("Q4_0", extra_args=("--no-warmup",))]  # fails in the simulated tool
    m = _measurer(tmp_path, [])
    confirmed = tune.confirm(m, cfgs, repetitions=1, n_predict=4)
    assert list(confirmed["status"]) == ["ok", "ok", "ok", "failed"]
    rows = confirmed.to_dict("records")
    assert [tune_config.config_from_row(r) for r in rows] == cfgs
    assert [tune_config.config_from_row(r) for r in m.rows] == [c for c in cfgs for _ in range(2)][:7]
    chosen = tune.choose(confirmed, cfgs[1])["full"]
    assert tune_config.config_from_row(chosen) in cfgs[:3]
    assert tune_config.config_from_row(rows[0]).label.endswith("t 2, fa on, ub 256")
    assert cfgs[2].label.endswith("t 4, tb 8, C 0xf0, Cb 0xff0, strict 1")


@pytest.mark.llama_cpp
def test_a_flag_the_build_lacks_is_reported_and_skipped(tiny_ggufs, llama_tool, tmp_path):
    from llava_gguf.llama_cpp import toolchain
    from llava_gguf.llama_cpp.mtmd import DEFAULT_IMAGE

    cli = llama_tool("llama-mtmd-cli")
    m = tune.Measurer(cli, {"F16": tiny_ggufs["text"]}, {("f16", "full"): tiny_ggufs["mmproj"]},
                      toolchain.source_asset(DEFAULT_IMAGE), "Hi", MtmdOptions(EvaluateParams(threads=2)), tmp_path)
    bad = tune_config.Config("F16", extra_args=("--flash-attn-v2",))  # an option of no llama.cpp build
    assert m.measure(bad, "screen", 2) is None
    row = m.rows[-1]
    assert row["status"] == "failed" and "--flash-attn-v2" in row["error"] and Path(row["log"]).exists()
    good = m.measure(tune_config.Config("F16", threads=2), "screen", 2)
    assert good["status"] == "ok" and good["answer_s"] > 0 and good["image_tokens"]


def test_screening_ranks_by_the_projected_full_answer(tmp_path):
    calls = []
    m = _measurer(tmp_path, calls)
    short = m.measure(tune_config.Config("Q5_K_M"), "screen", 4)
    projected = m.measure(tune_config.Config("Q5_K_M", threads=1), "screen", 4, answer_tokens=135)
    assert calls[-1][-1] == 4  # the run itself is short
    assert projected["answer_s"] == pytest.approx(tune_config.answer_seconds(projected, 135))
    assert projected["answer_s"] - short["answer_s"] > 0.110 * 130 * 0.9  # 131 more tokens at ~110 ms


def test_params_snippet_keys_are_evaluate_keys():
    import yaml

    cfg = tune_config.Config("Q4_K_M", threads=2, flash_attn="on", cache_type="q8_0")
    cfg = replace(cfg, cpu_mask="0xff", cpu_strict=1)
    text = yaml.safe_dump({"evaluate": {**cfg.settings(), "chat_template": "vicuna"}})
    e = EvaluateParams(**yaml.safe_load(text)["evaluate"])  # 'on' stays a string, null is the tool's default
    assert (e.threads, e.threads_batch, e.flash_attn, e.cache_type_v, e.ubatch_size) == (2, 2, "on", "q8_0", None)
    assert (e.cpu_mask, e.cpu_strict, e.cpu_mask_batch, e.cpu_strict_batch) == ("0xff", 1, None, 1)
