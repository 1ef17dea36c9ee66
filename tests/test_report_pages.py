"""The reports a reviewer reads, checked in headless Chromium (tests/browser.py) on a real tiny run,
and the pieces that make them readable: text progress in the step's kernel, log tails, number
formats, one colour per configuration, stage totals that add up, a visible Pareto front."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

import browser
from llava_gguf.pipeline import runner as pipeline
from llava_gguf.run import registry, workspace
from llava_gguf.reports import compare, html, plots, tables


# ----------------------------------------------------------------------------- the pages of a tiny run
@pytest.mark.llama_cpp
def test_every_page_of_a_tiny_run_passes_the_browser_checks(tiny_run, chromium, tmp_path):
    run, _ = tiny_run
    page = compare.render_comparison([run.dir], tmp_path / "compare.html")
    reports = sorted((run.dir / "reports").glob("[0-9][0-9]_*.html"))
    assert [r.stem for r in reports] == [registry.get(s).source.stem for s in pipeline.available_steps()]
    found = {p.name: chromium.check(p) for p in [*reports, run.dir / "reports" / "index.html", page]}
    failed = {name: {check: list(hits) for check, hits in checks.items()}
              for name, checks in found.items()}
    assert {name: {c: h for c, h in checks.items() if h} for name, checks in failed.items()
            if any(checks.values())} == {}
    assert "1 run compared" in page.read_text()


@pytest.mark.llama_cpp
def test_a_long_cell_log_is_a_tail_linking_the_whole_log_and_the_tool_logs(tiny_run):
    run, _ = tiny_run
    page = (run.dir / "reports" / "07_tune.html").read_text()
    links = re.findall(r"href=[\"'](\.\./logs/07_tune-cell\d+\.log)[\"']", page)  # nbconvert re-quotes
    assert links, "the tune cell's log is long enough to be cut to its tail"
    whole = (run.dir / "reports" / links[0]).resolve()
    assert len(whole.read_text().splitlines()) > html.LOG_TAIL
    tools = re.findall(r"href=[\"'](\.\./tune/logs/[^\"']+\.log)[\"']", page)
    assert tools and all((run.dir / "reports" / t).resolve().is_file() for t in tools)
    executed = nbformat.read(run.dir / "notebooks" / "07_tune.ipynb", as_version=4)
    kept = sum(o.get("text", "").count("\n") for c in executed.cells for o in c.get("outputs", [])
               if o.get("name") == "stderr")
    assert kept >= len(whole.read_text().splitlines()) - 1  # the executed notebook keeps every line


# ----------------------------------------------------------------------------- the checks themselves
BAD_PAGE = """<!doctype html><html><body style="margin:0">
<table><tr><td style="white-space:nowrap">{wide}</td></tr></table>
<p>answer 0.4168775620000146 s, TuneResult(speedup=2.4) {{'a': 1}}</p>
<p>median of 1 runs</p><img src="x.png"><img src="y.png" alt="a plot">
<div class="jp-OutputArea"><div data-mime-type="application/vnd.jupyter.stderr" style="height:300px">a</div>
<div data-mime-type="application/vnd.jupyter.stderr" style="height:300px">b</div></div>
<pre>TqdmWarning: IProgress not found</pre></body></html>"""


def test_each_browser_check_finds_what_it_looks_for(chromium, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(BAD_PAGE.format(wide="x" * 400))
    found = chromium.check(bad)
    assert any("right=" in w for w in found["wide"]) and any("scrollWidth" in w for w in found["wide"])
    assert len(found["float_repr"]) == 1 and len(found["dict_repr"]) == 2
    assert len(found["no_alt"]) == 1 and len(found["plural"]) == 1 and found["tqdm_warning"]
    assert found["tall_stderr"] and found["tall_stderr"][0].startswith("600 px in 2 boxes")
    good = tmp_path / "good.html"
    good.write_text("<!doctype html><p>answer 417 ms, 2.44× the seed's command, 1 run compared</p>"
                    "<img src='x.png' alt='Latency per answer by stage'>")
    assert not any(chromium.check(good).values())


# ----------------------------------------------------------------------------- the step's kernel
def test_the_step_kernel_has_text_progress_bars_and_readable_numbers(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='steps'):\n    pass\n"
        "import pandas as pd\npd.DataFrame({'s': [0.4168775620000146, 2.9e-07, 51531.498]})")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with tempfile.TemporaryDirectory() as ipc:
        km = pipeline.kernel_manager_class(tmp_path / "kernel.log", Path(ipc), [])
        NotebookClient(nb, timeout=120, kernel_name="python3", kernel_manager_class=km).execute()
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "TqdmWarning" not in text and "IProgress" not in text
    assert "steps: 100%" in text  # tqdm's text bar, not a widget
    table = outputs[-1]["data"]["text/html"]
    assert ">0.417<" in table and ">2.90e-07<" in table and ">51,531<" in table


# ----------------------------------------------------------------------------- log tails
def test_log_tails_keep_the_last_lines_and_link_the_whole_log(write_params):
    run = workspace.open_run(write_params({"run": "log-tails"}))
    tool_log = run.sub("logs") / "F16__0.log"
    tool_log.write_text("llama.cpp says hello\n")
    nb = nbformat.v4.new_notebook()
    lines = [f"12:00:{i:02d} INFO x: line {i}" for i in range(30)]
    lines[3] += f" (log {tool_log})"
    outs = [nbformat.v4.new_output("stream", name="stderr", text=line + "\n") for line in lines[:20]]
    outs.insert(5, nbformat.v4.new_output("stream", name="stdout", text="printed\n"))
    outs.append(nbformat.v4.new_output("stream", name="stderr", text="\rbar: 0%\rbar: 100%\n"))
    outs += [nbformat.v4.new_output("stream", name="stderr", text=line + "\n") for line in lines[20:]]
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=outs),
                nbformat.v4.new_code_cell("y", outputs=[nbformat.v4.new_output("stream", name="stderr", text="short\n")])]
    html.log_tails(nb, run, "07_tune")
    first = nb.cells[0].outputs
    assert [o.get("name", o.output_type) for o in first] == ["display_data", "stderr", "stdout"]
    assert first[1].text.splitlines() == lines[-html.LOG_TAIL:]
    note = first[0].data["text/html"]
    assert "href='../logs/07_tune-cell0.log'" in note and "href='../logs/F16__0.log'" in note
    whole = (run.dir / "logs" / "07_tune-cell0.log").read_text().splitlines()
    assert whole == lines[:20] + ["bar: 100%"] + lines[20:]  # a carriage return rewrites its line
    assert [o.text for o in nb.cells[1].outputs] == ["short\n"]  # a short log stays whole, unlinked


# ----------------------------------------------------------------------------- numbers and words
def test_numbers_are_written_to_three_significant_digits():
    f = tables.format_number
    assert [f(0.4168775620000146), f(2.435037311986015), f(12.3456), f(51531.498), f(2.9e-07)] == \
        ["0.417", "2.44", "12.3", "51,531", "2.90e-07"]
    assert [f(0), f(0.00123), f(999.7), f(float("nan")), f(None)] == ["0", "0.00123", "1,000", "NaN", "–"]
    assert tables.format_seconds(0.4168775620000146) == "417 ms" and tables.format_seconds(2.3223) == "2.32 s"
    assert tables.format_ratio(11.218452813674698) == "11.2×"
    assert [tables.plural(1, "run"), tables.plural(2, "run"), tables.plural(0, "case")] == ["1 run", "2 runs", "0 cases"]
    t = tables.mapping_table({"tune": {"recommended": "tune/recommended.json"}, "kld": 0.0198852, "ok": [1, 2]})
    assert t.values.tolist() == [["tune / recommended", "tune/recommended.json"], ["kld", "0.0199"], ["ok", "1, 2"]]


# ----------------------------------------------------------------------------- colours
def test_one_configuration_has_one_colour_in_every_plot():
    label = "Q4_K_M, mmproj f16, budget full, t 2"
    assert plots.config_color("Q4_K_M") == plots.config_color(label) == plots.config_color("q4_k_m")
    assert plots.config_color("F16") != plots.config_color("Q4_K_M")
    assert plots.config_color("my-own") == plots.config_color("my-own")  # stable for unknown names too
    tokens = pd.DataFrame([{"variant": v, "case": 0, "token": i, "itl_ms": 10.0 + i} for v in ("Q4_K_M", "F16")
                           for i in range(4)])
    fig = plots.token_latency(tokens)
    lines = {ln.get_label(): to_hex(ln.get_color()) for ln in fig.axes[0].get_lines()}
    assert lines == {v: to_hex(plots.config_color(v)) for v in ("F16", "Q4_K_M")}
    points = pd.DataFrame([{"config": label, "answer_s": 1.0, "answer_min_s": 0.9, "answer_max_s": 1.1, "kld": 0.02,
                            "budget": "full"}, {"config": "F16", "answer_s": 2.0, "kld": None, "budget": "full"}])
    fig = plots.pareto_plot(points)
    colours = {to_hex(c.lines[0].get_color()) for c in fig.axes[0].containers}
    assert colours == {to_hex(plots.config_color("Q4_K_M")), to_hex(plots.config_color("F16"))}


# ----------------------------------------------------------------------------- stages and the front
def test_stage_bars_add_up_to_the_headline_figure():
    runs = pd.DataFrame([{"variant": "Q4_K_M", "case": c, "load_ms": 120.0, "image_encode_ms": 200.0,
                          "image_decode_ms": 150.0, "prompt_eval_ms": 170.0, "eval_ms": 10.0, "answer_s": a}
                         for c, a in enumerate((0.70, 0.74))])
    fig = plots.latency_breakdown(runs, total="answer_s")
    ax = fig.axes[0]
    heights = sum(p.get_height() for p in ax.patches)
    assert heights == pytest.approx(0.72)
    assert [t.get_text() for t in ax.texts] == [tables.format_seconds(0.72)] == ["720 ms"]
    assert plots.OTHER_STAGE[1] in [t.get_text() for t in ax.get_legend().get_texts()]
    without = plots.latency_breakdown(runs).axes[0]
    assert [t.get_text() for t in without.texts] == ["480 ms"]  # llama.cpp's timers alone


def test_the_pareto_front_is_drawn_and_every_point_stays_readable():
    points = pd.DataFrame([
        {"config": "Q5_K_M, mmproj f16, budget full", "answer_s": 290.0, "kld": 0.01, "budget": "full"},  # the seed
        {"config": "Q4_K_M, mmproj f16, budget full, t 12", "answer_s": 26.0, "kld": 0.03, "budget": "full"},
        {"config": "Q8_0, mmproj f16, budget full, t 12", "answer_s": 28.0, "kld": 0.001, "budget": "full"},
        {"config": "Q4_K_M, mmproj q8_0, budget single, t 12", "answer_s": 9.0, "kld": 0.03, "budget": "single"}])
    fig = plots.pareto_plot(points, baseline="Q5_K_M, mmproj f16, budget full")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # 9 s and 290 s both readable
    front = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
    assert len(front) == 1 and front[0].get_linewidth() >= 2
    x, y = front[0].get_data()
    assert min(x) == 9.0 and max(x) == ax.get_xlim()[1]  # to the plot's edge
    assert plots.pareto_front(list(zip(points["answer_s"], points["kld"]))) == [3, 2]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert all(x0 < t < x1 for t in points["answer_s"]) and all(y0 <= k < y1 for k in points["kld"])
    single = plots.pareto_plot(points.iloc[[1]]).axes[0]
    line = next(ln for ln in single.get_lines() if ln.get_label() == "Pareto front")
    assert np.ptp(line.get_xdata()) > 0 and np.ptp(line.get_ydata()) > 0  # one point still shows its front
    assert "Pareto front" in fig.alt_text()
