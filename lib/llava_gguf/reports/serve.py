"""Step 08's plot: per-turn latency of a conversation with llama-server against the one-shot answer."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import plots
from ..run.workspace import Run


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


def memory_table(summary: dict) -> pd.DataFrame:
    """The server's memory during step 08, one row per figure, MiB: resident (psutil) at ready, after
    the first case's conversation and at its peak; the KV cache and the prompt cache from its log.
    Descriptions short enough for a notebook's table cell (pandas cuts at 50 characters)."""
    s = summary
    rows = (("server_rss_ready_mib", "resident, ready (no request yet)"),
            ("server_rss_mib", f"resident after case 0's {s.get('conversation_turns')} turns"),
            ("server_rss_anon_mib", "... of it not file-backed (not the weights)"),
            ("server_rss_arenas_mib", "... of it in malloc's thread arenas"),
            ("server_peak_rss_mib", "peak resident over the step"),
            ("kv_cache_mib", f"KV cache: {s.get('kv_cache_cells')} cells, K {s.get('kv_cache_type_k')}, "
                             f"V {s.get('kv_cache_type_v')}"),
            ("prompt_cache_max_mib", "prompt cache in host memory, largest"))
    return pd.DataFrame([{"what": what, "MiB": round(float(s[key]), 1)} for key, what in rows if s.get(key) is not None],
                        columns=["what", "MiB"])


def memory_line(summary: dict) -> str:
    """'server 812 MiB resident after 3 turns (KV cache 2048 MiB)', for the index headline ('' without figures)."""
    if summary.get("server_rss_mib") is None:
        return ""
    kv = f", KV cache {summary['kv_cache_mib']:.0f} MiB" if summary.get("kv_cache_mib") is not None else ""
    return (f"server {summary['server_rss_mib']:.0f} MiB resident after {summary.get('conversation_turns', 3)} turns "
            f"(peak {summary.get('server_peak_rss_mib') or summary['server_rss_mib']:.0f} MiB{kv})")
