"""Step 07's report: its plots and the index headline, read from what the step (steps/tune.py) wrote."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import headline, plots
from ..run import machine_load as load
from ..run.workspace import Run


# ----------------------------------------------------------------------------- plots
def figures(run: Run, result, base) -> dict:
    return {"latency": latency_spread(result.confirmed, base.label, run),
            "pareto": pareto(result.confirmed, result.quality.get("kld") or {}, run, base.label),
            "stages": stage_breakdown(result, base.label, run)}


def latency_spread(confirmed: pd.DataFrame, baseline: str, run: Run | None = None):
    """Median answer time per confirmed configuration, the bar from its fastest to its slowest run."""
    ok = confirmed[confirmed["status"] == "ok"].sort_values("answer_s", ascending=False)
    fig = plots.PlotFigure(figsize=(9, 0.45 * len(ok) + 1.6))
    ax = fig.add_subplot()
    y = np.arange(len(ok))
    med = ok["answer_s"].to_numpy(dtype=float)
    err = [med - ok["answer_min_s"].to_numpy(dtype=float), ok["answer_max_s"].to_numpy(dtype=float) - med]
    loaded = [load.loaded(r) for r in ok.to_dict("records")]
    ax.barh(y, med, xerr=err, color=[plots.config_color(c) for c in ok["config"]], capsize=3,
            hatch=[("//" if c == baseline else "") + (load.HATCH if hot else "") for c, hot in zip(ok["config"], loaded)],
            edgecolor="black", linewidth=0.5)
    ax.set_yticks(y, [load.mark(("seed's command: " if c == baseline else "") + c, hot)
                      for c, hot in zip(ok["config"], loaded)], fontsize=7)
    ax.set_xlabel("seconds to a full answer (median; bar = min..max of the runs)")
    ax.set_title("Confirmed configurations")
    plots.save(fig, run, "tune_latency")
    return fig


def pareto(confirmed: pd.DataFrame, kld: dict, run: Run | None = None, baseline: str | None = None):
    """Answer time vs the quant type's KL divergence (unmeasured: 0), one marker per image budget."""
    ok = confirmed[confirmed["status"] == "ok"].reset_index(drop=True)
    points = ok.assign(kld=[kld.get(q) for q in ok["quant"]])
    return plots.pareto_plot(points, baseline, run, "tune_pareto")


def stage_breakdown(result, baseline: str, run: Run | None = None):
    """Stacked stages of the median run of the seed's command and of each budget's recommendation."""
    rec = result.recommended.get("budgets") or {}
    names = {baseline: "seed's command", **{v["config"]: f"recommended\n({b})" for b, v in rec.items()}}
    runs = result.runs
    sel = runs[(runs["phase"] == "confirm") & runs["config"].isin(names)].copy()
    # One run per configuration, the one at its median: a mean would mix in a slow outlier.
    sel["off"] = (sel["answer_s"] - sel.groupby("config")["answer_s"].transform("median")).abs()
    sel = sel.sort_values("off").drop_duplicates("config")
    sel["variant"] = sel["config"].map(names)
    ok = result.confirmed[result.confirmed["status"] == "ok"]
    sel["answer_s"] = sel["config"].map(ok.set_index("config")["answer_s"])  # the headline's median
    sel = sel.set_index("variant").loc[[n for n in names.values() if n in set(sel["variant"])]].reset_index()
    fig = plots.latency_breakdown(sel.drop(columns="text_prompt_ms", errors="ignore"), None, total="answer_s")
    fig.axes[0].set_ylabel("seconds (the median run)")
    plots.save(fig, run, "tune_stages")
    return fig


# ----------------------------------------------------------------------------- index.html
def headline_html(run: Run) -> str | None:
    """The first line of index.html (reports/headline.py), None before step 07 has run."""
    return headline.headline_html(run)
