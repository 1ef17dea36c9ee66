"""Rendered reports: one shared stylesheet, alt text on every image, rounded tables, history in the index."""
from __future__ import annotations

import math
import re

import nbformat
import numpy as np
import pandas as pd
import pytest

from llava_gguf.pipeline import runner as pipeline
from llava_gguf.run import registry, workspace
from llava_gguf.reports import html, plots, tables

# Executed for real (nbclient) so that the figure's alt text goes through the kernel's output metadata.
PLOT_CELL = """import pandas as pd
from llava_gguf.reports import plots
runs = pd.DataFrame([{"variant": v, "case": 0, "load_ms": 100.0, "image_encode_ms": 900.0, "image_decode_ms": 2000.0,
                      "prompt_eval_ms": 2500.0, "eval_ms": 300.0} for v in ("F16", "Q8_0")])
plots.latency_breakdown(runs)"""
IMAGE_CELL = """from IPython.display import Image
Image(data=plots.PlotFigure(figsize=(1, 1))._repr_png_())"""
NBCONVERT_DEFAULT_ALT = "No description has been provided for this image"


@pytest.fixture
def run(write_params, request):
    return workspace.open_run(write_params({"run": f"reports-{request.node.name}"}))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """An executed notebook: a library plot, a plain image without alt text, a DataFrame."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Report test"), nbformat.v4.new_code_cell(PLOT_CELL),
                nbformat.v4.new_code_cell(IMAGE_CELL), nbformat.v4.new_code_cell("runs")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    path = tmp_path_factory.mktemp("nb") / "01_download.ipynb"
    nbformat.write(nb, path)
    return path


def _head(page: str) -> str:
    return page[:page.index("</head>")]


def test_report_links_one_shared_stylesheet(executed, run):
    out = html.render_notebook(executed, run)
    page = out.read_text()
    links = re.findall(r'<link rel="stylesheet" type="text/css" href="(assets/notebook-[0-9a-f]{16}\.css)">', page)
    assert len(links) == 1
    css = (out.parent / links[0]).read_text()
    assert ".jp-Notebook" in css and len(css) > 100_000  # the JupyterLab stylesheet moved there
    assert "<style" not in _head(page)
    assert ".jp-Notebook" not in page  # no inline copy of its rules
    assert len(page) < 200_000
    # A second report with the same styles reuses the file; nothing half-written is left.
    again = html.render_notebook(executed, run)
    assert re.findall(r'href="(assets/[^"]+)"', again.read_text()) == links
    assert [p.name for p in (out.parent / "assets").iterdir()] == [links[0].split("/")[1]]


def test_every_image_has_alt_text_and_plots_say_what_they_show(executed, run):
    page = html.render_notebook(executed, run).read_text()
    imgs = re.findall(r"<img[^>]*>", page)
    assert len(imgs) == 2
    alts = [re.search(r'alt="([^"]*)"', i).group(1) for i in imgs]
    assert alts[0] == "Latency per answer by stage"
    assert alts[1] and NBCONVERT_DEFAULT_ALT not in alts[1]  # ours, not nbconvert's "missing" fallback


def test_plot_figure_mimebundle_carries_its_titles():
    fig = plots.PlotFigure()
    fig.suptitle("Run x")
    fig.subplots(1, 2)[1].set_title("histogram")
    data, meta = fig._repr_mimebundle_()
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert meta == {"image/png": {"alt": "Run x; histogram"}}


def test_rounding_rules():
    df = pd.DataFrame({"variant": ["F16", "Q4_K_M"], "eval_ms": [123.456789, 0.04],
                       "eval_tokens_per_s": [4.56789, 10.0], "size_mib": [1234.56789, 0.0029296875],
                       "kld": [0.0, 0.000123456], "kld_p99": [1.23456, np.nan], "nmse": [2.3456e-7, 0.5],
                       "same_top_pct": [99.456, 100.0], "cases": [2, 2], "wall_s": [1.23456, 2.0],
                       "rms_dp_pct": [0.001, 2.345678], "unnamed_ratio": [0.123456, 1.0]})
    out = tables.rounded(df)
    assert out["eval_ms"].tolist() == [123.5, 0.0]
    assert out["eval_tokens_per_s"].tolist() == [4.57, 10.0]
    assert out["size_mib"].tolist() == [1234.568, 0.003]
    assert out["kld"].tolist() == [0.0, 0.000123]  # significant digits: small divergences stay visible
    assert out["kld_p99"][0] == 1.23 and math.isnan(out["kld_p99"][1])
    assert out["nmse"].tolist() == [2.35e-7, 0.5]
    assert out["same_top_pct"].tolist() == [99.5, 100.0]
    assert out["rms_dp_pct"].tolist() == [0.001, 2.35]  # a divergence in %, not a plain percentage
    assert out["wall_s"].tolist() == [1.235, 2.0]
    assert out["cases"].dtype == df["cases"].dtype and out["variant"].tolist() == ["F16", "Q4_K_M"]
    assert out["unnamed_ratio"].tolist() == df["unnamed_ratio"].tolist()  # no rule names it: untouched
    assert df["eval_ms"][0] == 123.456789  # the input (the metrics' frame) keeps full precision
    assert tables.rounded(None) is None


def test_every_rule_is_the_first_match_of_a_typical_column():
    typical = ["prompt_tokens_per_s", "load_ms", "t_s", "size_mib", "size_gib", "same_top_pct", "bpw", "ppl",
               "kld_err", "same_answer", "prefix_tokens"]
    first = [next(i for i, (p, _, _) in enumerate(tables.ROUNDING) if re.fullmatch(p, n)) for n in typical]
    assert sorted(first) == list(range(len(tables.ROUNDING)))  # no rule is dead or shadowed


def test_index_lists_history_and_kept_reports_still_find_their_stylesheet(executed, run):
    step = registry.get("download")
    kept = pipeline.executed_path(step, run)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(executed.read_bytes())
    html.render_notebook(kept, run)
    assert "No earlier runs" in html.render_index(run).read_text()

    dest = pipeline.keep_previous(step, run)
    assert (dest / "01_download.ipynb").exists() and not kept.exists()
    moved = dest / "01_download.html"
    css = re.search(r'href="(assets/[^"]+)"', moved.read_text()).group(1)
    assert (dest / css).read_text() == (run.dir / "reports" / css).read_text()

    index = html.render_index(run).read_text()
    history = index[index.index("<h2>History</h2>"):]
    assert f"href='../history/{dest.name}/01_download.html'" in history
    assert f"href='../history/{dest.name}/01_download.ipynb'" in history
    assert (run.dir / "reports" / f"../history/{dest.name}/01_download.html").resolve() == moved.resolve()
