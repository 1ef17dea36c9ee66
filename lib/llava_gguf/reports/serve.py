"""Step 08's plot: per-turn latency of a conversation with llama-server against the one-shot answer."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import plots
from ..workspace import Run


KIND_COLORS = {"first": "tab:red", "follow-up": "tab:blue"}  # any other kind: a cached image (orange)


def turn_latency(turns: pd.DataFrame, one_shot_s: float | None, run: Run | None = None):
    """Per turn (cases side by side): the server's time to the first token and whole answer, beside
    the one-shot run-llava.sh answer to the same question (gray). Bars are labelled with the prompt
    tokens the server processed / took from its cache."""
    fig = plots.PlotFigure(figsize=(max(6.0, 1.3 * len(turns) + 2), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(turns))
    w = 0.4
    total = turns["total_s"].to_numpy(dtype=float)
    ttft = turns["ttft_s"].to_numpy(dtype=float)
    colors = [KIND_COLORS.get(k, "tab:orange") for k in turns["kind"]]
    ax.bar(x - w / 2, total, w, color=colors, alpha=0.45, label="server: whole answer")
    ax.bar(x - w / 2, ttft, w, color=colors, label="server: time to first token")
    shots = turns["one_shot_s"].to_numpy(dtype=float) if "one_shot_s" in turns else np.full(len(turns), np.nan)
    ax.bar(x + w / 2, shots, w, color="tab:gray", label="one-shot run-llava.sh, same question")
    for xi, t, p, c in zip(x, total, turns["prompt_n"], turns["cache_n"]):
        ax.annotate(f"{p} new\n{c} cached", (xi - w / 2, t), ha="center", va="bottom", fontsize=7)
    total = [*total, *np.nan_to_num(shots)]
    ax.set_xticks(x, [f"case {c}\nturn {t}" for c, t in zip(turns["case"], turns["turn"])], fontsize=8)
    ax.set_ylim(0, 1.25 * max([*total, one_shot_s or 0.0]))  # room for the labels above the bars
    ax.set_ylabel("seconds")
    ax.set_title("A conversation with llama-server: first question (red), follow-ups (blue),\n"
                 "a new question about an image already seen (orange), one-shot (gray)")
    ax.legend(fontsize=8)
    plots.save(fig, run, "serve_turns")
    return fig
