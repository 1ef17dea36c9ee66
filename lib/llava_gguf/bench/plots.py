"""The benchmark's plots: conversion cost per step, memory over time, llama-bench tokens/s.

Made like every plot of the project (reports/plots.py): matplotlib's object API, no pyplot.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .procmon import GiB
from .records import LEGACY, PROJECT, REFERENCE, TARGET_PEAK_ANON, StepRecord
from ..reports.plots import PlotFigure, save
from ..run.workspace import Run

# ----------------------------------------------------------------------------- plots
_COLORS = {PROJECT: "tab:blue", LEGACY: "tab:orange", REFERENCE: "tab:gray"}


def make_plots(run: Run, records: list[StepRecord], inference: pd.DataFrame) -> dict[str, Path]:
    out: dict[str, Path] = {}
    conv = [r for r in records if r.recipe in _COLORS]
    labels = [f"{r.recipe}: {r.step}" for r in conv]
    colors = [_COLORS[r.recipe] for r in conv]
    fig = PlotFigure(figsize=(15, 0.45 * len(conv) + 1.8))
    axes = fig.subplots(1, 3, sharey=True)
    panels = (("wall time (s)", [r.m.wall_s for r in conv], None),
              ("peak memory (GiB): anonymous, + file-backed hatched",
               [r.m.peak_anon / GiB for r in conv], [r.m.peak_file / GiB for r in conv]),
              ("written (GiB)", [r.m.write_bytes / GiB for r in conv], None))
    y = range(len(conv))
    for ax, (title, values, extra) in zip(axes, panels):
        ax.barh(y, values, color=colors)
        if extra:
            ax.barh(y, extra, left=values, color="none", edgecolor=colors, hatch="//")
            ax.axvline(TARGET_PEAK_ANON / GiB, color="red", ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(y), labels)
    axes[0].invert_yaxis()
    fig.tight_layout()
    out["conversion"] = save(fig, None, "conversion", run.dir)

    timed = [(recipe, [r for r in conv if r.recipe == recipe and r.m.timeline]) for recipe in (PROJECT, LEGACY)]
    timed = [(k, v) for k, v in timed if v]
    if timed:
        fig = PlotFigure(figsize=(12, 3.2 * len(timed)))
        axes = fig.subplots(len(timed), 1, squeeze=False, sharey=True)
        for ax, (recipe, recs) in zip(axes[:, 0], timed):
            t0 = 0.0
            for r in recs:
                ts = [t0 + s[0] for s in r.m.timeline]
                ax.fill_between(ts, [s[1] / GiB for s in r.m.timeline], color=_COLORS[recipe], alpha=0.6, lw=0)
                ax.plot(ts, [(s[1] + s[2]) / GiB for s in r.m.timeline], color="black", lw=0.6)
                ax.axvline(t0, color="gray", lw=0.5)
                ax.text(t0, ax.get_ylim()[1] * 0.02, f" {r.step}", fontsize=8, rotation=90, va="bottom")
                t0 += r.m.wall_s
            ax.axhline(TARGET_PEAK_ANON / GiB, color="red", ls="--", lw=1)
            ax.set_title(f"{recipe}: anonymous memory (filled), + file-backed (line), steps back to back", fontsize=10)
            ax.set_ylabel("GiB")
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("seconds")
        fig.tight_layout()
        out["memory"] = save(fig, None, "memory", run.dir)

    if inference is not None and len(inference):
        tests = list(dict.fromkeys(inference["test"]))
        fig = PlotFigure(figsize=(6 * len(tests), 4))
        axes = fig.subplots(1, len(tests), squeeze=False)
        for ax, test in zip(axes[0], tests):
            sel = inference[inference["test"] == test]
            for q, g in sel.groupby("quant", sort=False):
                g = g.sort_values("threads")
                ax.errorbar(g["threads"], g["tokens_per_s"], yerr=g["stddev"], marker="o", capsize=3,
                            label=f"{q} ({g['file_GiB'].iloc[0]:.2f} GiB)")
            ax.set_title(f"{test}: {'prompt processing' if test.startswith('pp') else 'generation'}", fontsize=10)
            ax.set_xlabel("threads")
            ax.set_ylabel("tokens/s")
            ax.set_xticks(sorted(set(sel["threads"])))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out["inference"] = save(fig, None, "inference", run.dir)
    return out
