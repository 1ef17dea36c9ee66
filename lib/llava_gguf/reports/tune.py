"""Step 07's report: its plots and the index headline, read from what the step (steps/tune.py) wrote."""
from __future__ import annotations

import html
import json

import numpy as np
import pandas as pd

from . import plots
from .serve import memory_line
from .tables import format_ratio_range, plural
from ..workspace import Run


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
    ax.barh(y, med, xerr=err, color=[plots.config_color(c) for c in ok["config"]], capsize=3,
            hatch=["//" if c == baseline else "" for c in ok["config"]], edgecolor="black", linewidth=0.5)
    ax.set_yticks(y, [("seed's command: " if c == baseline else "") + c for c in ok["config"]], fontsize=7)
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
def published_headline(info: dict) -> str:
    """The headline's first ratio: to the published recipe, named, or why it is not there."""
    pub = info.get("published") or {}
    if not pub:
        return ""
    budget = (info.get("recommended") or {}).get("budget")
    r = ((pub.get("ratios") or {}).get(budget) or {}).get("vs_published")
    if pub.get("measured") and r:
        return (f"{format_ratio_range(r)} faster than {html.escape(pub['name'])} ({html.escape(pub['description'])}: "
                f"{pub['answer_s']:.1f} s) and ")
    return f"{html.escape(pub['name'])}: {html.escape(str(pub.get('why_not') or 'not measured'))}; "


def headline_html(run: Run) -> str | None:
    """The first line of index.html, None before step 07 has run."""
    path = run.dir / "tune" / "recommended.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    rec, base = info.get("recommended") or {}, info.get("baseline") or {}
    if not rec.get("answer_s") or not base.get("answer_s"):
        return None
    ratios = (info.get("published") or {}).get("ratios") or {}
    same = (ratios.get(rec.get("budget")) or {}).get("vs_same_build")
    parts = [f"<p><b>on this machine: answer in {rec['answer_s']:.1f} s with {html.escape(rec['config'])}, "
             + published_headline(info) + (format_ratio_range(same) if same else f"{rec['speedup']:.2f}×")
             + " faster than the seed's command" + (" on this build" if info.get("published") else "")
             + f" ({base['answer_s']:.1f} s)</b>"]

    def _vs(b: str, v: dict) -> str:
        pub = (ratios.get(b) or {}).get("vs_published")
        return (f"{pub['ratio']:.2f}× the published recipe, {v['speedup']:.2f}× the seed's command on this build"
                if pub else f"{v['speedup']:.2f}×")
    others = [f"{html.escape(b)}: {v['answer_s']:.1f} s ({_vs(b, v)})"
              for b, v in (info.get("budgets") or {}).items() if b != rec.get("budget") and v.get("speedup")]
    if others:
        parts.append("; smaller image budgets: " + ", ".join(others))
    setup = info.get("setup") or {}
    parts.append(f" — {setup.get('n_predict')} tokens, median of {plural(int(setup.get('repetitions') or 0), 'run')} "
                 "(<a href='../run-llava.sh'>run-llava.sh</a>)")
    if info.get("notes"):
        parts.append("<br><small>" + html.escape("; ".join(info["notes"])) + "</small>")
    served = run.dir / "conversation" / "summary.json"
    if served.exists():  # step 08: a conversation with serve-llava.sh
        s = json.loads(served.read_text())
        parts.append(f"<br><b>follow-up answer in {s['follow_up_total_s']:.1f} s (first answer {s['first_total_s']:.1f} s, "
                     f"one-shot run-llava.sh {s['one_shot_s']:.1f} s)</b> with <a href='../serve-llava.sh'>serve-llava.sh</a>: {s['follow_up_prompt_n']} new prompt "
                     f"tokens per follow-up instead of {s['first_prompt_n']} (median over {s['cases']} case(s))")
        if memory_line(s):
            parts.append("; " + memory_line(s))
    return "".join(parts) + "</p>"
