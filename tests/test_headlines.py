"""Honest headlines: the index names one winner with its spread and load, a run under load is marked
in the tables and plots that show it, and "N× faster" appears only where winner.py says faster."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from synthetic_runs import make_evaluated_run, recommended_json

from llava_gguf.run import workspace
from llava_gguf.run import machine_load as load
from llava_gguf.reports import html, plots
from llava_gguf.reports import tune as tune_report

LABEL = "Q4_K_M, mmproj f16, budget full, t 2"
SEED_RUNS = [2.91, 3.40, 3.05]


def _text(page: str) -> str:
    """A page's visible text, tags dropped and entities read."""
    import html as h

    body = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", h.unescape(re.sub(r"<[^>]+>", " ", body)))


def _tuned_index(write_params, name, runs, runs_under_load=0, loaded=("Q8_0",)):
    run = make_evaluated_run(write_params, name, loaded=loaded)
    workspace.write_json(run.sub("tune") / "recommended.json",
                         recommended_json(LABEL, runs, SEED_RUNS, runs_under_load=runs_under_load))
    return run, html.render_index(run).read_text()


def test_index_gives_one_winner_with_its_spread_and_load(write_params):
    run, page = _tuned_index(write_params, "headline-faster", [2.20, 2.31, 2.47], runs_under_load=1)
    text = _text(page)
    headline = text[:text.index("Run ")]
    assert ("on this machine: answer in 2.31 s (median of 3 runs, 2.20 s .. 2.47 s) with " + LABEL +
            ": 1.32× faster than the seed's command (3.05 s, median of 3 runs, 2.91 s .. 3.40 s)") in headline
    assert ("measured at load 1.9 (1-min average), other processes 0.04 cores, 3 % steal; 1 of 6 runs under load "
            "(other processes over 0.25 cores)") in headline
    assert "smaller image budgets: single: 2.32 s (1.31× faster than the seed's command)" in headline
    # Step 06's pick is not a second winner: labelled, and said not to be the recommendation.
    assert "Fastest quant type in evaluate: Q4_K_M" in text and "Not the run's recommendation" in text
    assert "no seed comparison" not in text and text.count("× faster") == 2  # the two budgets' own claims


def test_overlapping_spreads_or_one_run_claim_nothing(write_params):
    _, page = _tuned_index(write_params, "headline-same", [0.88, 0.93, 4.40])  # median 3.3x lower
    text = _text(page)
    main = text[:text.index("smaller image budgets")]
    assert "with " + LABEL + ": same speed as the seed's command (3.05 s, median of 3 runs" in main
    assert "within the spread — measured at load 1.9" in main and "× faster" not in main
    run = make_evaluated_run(write_params, "headline-one")
    workspace.write_json(run.sub("tune") / "recommended.json", recommended_json(LABEL, [0.41], [1.02], repetitions=1))
    text = _text(html.render_index(run).read_text())
    assert ("answer in 410 ms (one run) with " + LABEL + ": no speed claim against the seed's command "
            "(1.02 s, one run): one run each") in text and "× faster" not in text


def test_a_run_under_load_is_marked_in_the_tables_and_plots(write_params):
    run, page = _tuned_index(write_params, "headline-marked", [2.20, 2.31, 2.47], loaded=("Q8_0",))
    text = _text(page)
    # The evaluation table's row of runs under load: Q8_0's one run (of two cases) is counted.
    row = re.search(r"runs under load \(other processes over the threshold\) ((?:\d+ ?)+)", text).group(1).split()
    assert row == ["0", "1", "0", "0"]  # F16, Q8_0, Q4_K_M, Q2_K
    assert "1 of 8 runs under load (other processes over 0.25 cores)" in text  # the evaluate line's load
    runs = pd.read_csv(run.dir / "metrics" / "runs.csv")
    fig = plots.latency_breakdown(runs)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "Q8_0\n(under load)" in ticks and "F16" in ticks
    hatched = {p.get_hatch() for p in fig.axes[0].patches}
    assert load.HATCH in hatched
    # Step 07's confirmed configurations: a configuration with a run kept under load is marked.
    confirmed = pd.DataFrame([
        {"config": LABEL, "status": "ok", "answer_s": 2.31, "answer_min_s": 2.2, "answer_max_s": 2.47, "kld": 0.03,
         "budget": "full", "runs_under_load": 1},
        {"config": "Q5_K_M, mmproj f16, budget full", "status": "ok", "answer_s": 3.05, "answer_min_s": 2.91,
         "answer_max_s": 3.4, "kld": 0.01, "budget": "full", "runs_under_load": 0}])
    fig = tune_report.latency_spread(confirmed, "Q5_K_M, mmproj f16, budget full")
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert f"{LABEL} (under load)" in ticks and "seed's command: Q5_K_M, mmproj f16, budget full" in ticks
    assert any(load.HATCH in (p.get_hatch() or "") for p in fig.axes[0].patches)
    fig = plots.pareto_plot(confirmed, "Q5_K_M, mmproj f16, budget full")
    assert any(t.get_text().startswith(load.MARK) for t in fig.axes[0].get_legend().get_texts())


@pytest.mark.parametrize("runs", [[2.20, 2.31, 2.47], [0.88, 0.93, 4.40]])
def test_the_headline_page_passes_the_browser_checks(write_params, chromium, runs):
    run, _ = _tuned_index(write_params, f"headline-browser-{len(set(runs))}-{runs[0]}", runs, runs_under_load=1)
    found = chromium.check(run.dir / "reports" / "index.html")
    assert {check: hits for check, hits in found.items() if hits} == {}


def test_a_file_without_the_seeds_spread_claims_nothing_against_it():
    # A recommended.json from before the baseline entry: the seed's median only, tune.repetitions 3.
    from llava_gguf.reports import headline

    info = {"setup": {"repetitions": 3}, "seed_answer_s": 3.05,
            "recommended": {"config": LABEL, "answer_s_all": [2.20, 2.31, 2.47], "answer_s": 2.31}}
    text = headline.tune_headline(info)
    assert ("no speed claim against the seed's command (3.05 s, median of 3 runs, spread not recorded): "
            "their spread not recorded") in text and "faster" not in text
