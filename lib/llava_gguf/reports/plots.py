"""The evaluation plots: latency breakdown, per-token latency, size vs KLD vs speed.

Colours mean one thing on every page: `config_color(label)` gives a configuration the colour of
its quant type (the model file it runs: "Q4_K_M" and "Q4_K_M, mmproj f16, budget full, t 2" are
both purple) in step 06's plots, step 07's and the comparison page's; a stage of an answer has the
colour of STAGE_COLORS everywhere. Seconds and ratios are written by tables.format_seconds/_ratio. A run or configuration measured
under load (machine_load.py) is marked in every plot: "(under load)" after its label, and its bars
hatched (load.HATCH).

Figures are made with matplotlib's object API (`matplotlib.figure.Figure`), never pyplot: no
global figure state, no GUI backend is touched, so this is safe headless (papermill, CI) and a
notebook still shows the returned Figure inline. Each is also saved as a PNG under
`outputs/<run>/plots/` (written to a temporary name and renamed).
"""
from __future__ import annotations

import io
import logging
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..model import quant_types
from .tables import format_seconds
from ..run import machine_load as load
from ..run.workspace import Run, atomic_path

log = logging.getLogger(__name__)

# The stages of one llama-mtmd-cli answer, in the order they happen: (column, label).
# llama.cpp's "prompt eval time" counts every batched decode, the image embeddings' included, so
# the text prompt's share is prompt eval minus the image batch decodes.
STAGES = [
    ("load_ms", "load models"),
    ("image_encode_ms", "image encode (CLIP)"),
    ("image_decode_ms", "image decode (LLM)"),
    ("text_prompt_ms", "prompt eval (text)"),
    ("eval_ms", "generation"),
]
_DPI = 110
# The one colour map of configurations, keyed by quant type; any other name gets a colour of
# EXTRA_COLORS picked from a checksum of its name (the same in every process, unlike hash()).
CONFIG_COLORS = {
    "F16": "tab:blue", "BF16": "tab:cyan", "F32": "tab:gray", "Q8_0": "tab:orange", "Q6_K": "tab:green",
    "Q5_K_M": "tab:red", "Q5_K_S": "#ff9896", "Q5_0": "tab:pink", "Q5_1": "#f7b6d2", "Q4_K_M": "tab:purple",
    "Q4_K_S": "#c5b0d5", "Q4_0": "tab:brown", "Q4_1": "#c49c94", "IQ4_NL": "#dbdb8d", "IQ4_XS": "tab:olive",
    "Q3_K_L": "#9edae5", "Q3_K_M": "#17becf", "Q3_K_S": "#aec7e8", "Q2_K": "#7f7f7f",
}
EXTRA_COLORS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
STAGE_COLORS = {"load_ms": "#bdbdbd", "image_encode_ms": "#6baed6", "image_decode_ms": "#2171b5",
                "text_prompt_ms": "#fd8d3c", "eval_ms": "#41ab5d", "generation_ms": "#41ab5d", "other_ms": "#f0f0f0"}
OTHER_STAGE = ("other_ms", "outside llama.cpp's timers (start, sampling, exit)")


def config_key(label) -> str:
    """The part of a configuration's label its colour follows: the quant type, its first field."""
    return str(label).split(",")[0].strip().upper()


def config_color(label) -> str:
    key = config_key(label)
    if key in CONFIG_COLORS:
        return CONFIG_COLORS[key]
    return EXTRA_COLORS[zlib.crc32(key.encode()) % len(EXTRA_COLORS)]


class PlotFigure(Figure):
    """A Figure that renders itself as PNG in Jupyter.

    IPython's inline PNG formatter for Figure is only registered once pyplot is imported with the
    inline backend; this library never imports pyplot, so the figure carries its own `_repr_png_`.
    The mime bundle adds the figure's titles as the image's alt text (output metadata
    image/png.alt, which the HTML reports put on the <img>).
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
        return buf.getvalue()

    def alt_text(self) -> str:
        """The suptitle and the axes' titles, joined: what the figure shows, in words."""
        sup = self._suptitle.get_text() if self._suptitle is not None else ""
        titles = [sup] + [ax.get_title() for ax in self.axes]
        return "; ".join(t for t in titles if t) or "plot"

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"image/png": self._repr_png_()}, {"image/png": {"alt": self.alt_text()}}


def precision_order(variants) -> list[str]:
    """Most precise first (F16, Q8_0, ..., Q4_0), unknown names last in their given order."""
    names = list(dict.fromkeys(variants))
    return sorted(names, key=lambda n: -quant_types.bits_per_weight(n, -1.0))


def save(fig: Figure, run: Run | None, name: str, folder: Path | None = None) -> Path | None:
    """Write `fig` as <plots>/<name>.png; returns the path (None without a run or folder)."""
    folder = folder or (run.sub("plots") if run is not None else None)
    if folder is None:
        return None
    path = Path(folder) / f"{name}.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    log.info("plot %s", path)
    return path


def with_stages(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` plus `text_prompt_ms`: llama.cpp's prompt eval less the image encodes and decodes.

    mtmd-cli queues the text before the image and llama.cpp only books a decode when it next
    synchronizes, so its "prompt eval time" runs from that first decode across every CLIP encode
    and image batch decode (the seed's O6 log: 282.5 s = 1.7 s text + 10.0 s encode + 270.8 s decode).
    """
    out = runs.copy()
    if "text_prompt_ms" not in out and "prompt_eval_ms" in out:
        image = sum(out[c].fillna(0.0) for c in ("image_encode_ms", "image_decode_ms") if c in out)
        out["text_prompt_ms"] = (out["prompt_eval_ms"] - image).clip(lower=0.0)
    return out


def latency_breakdown(runs: pd.DataFrame, run: Run | None = None, total: str | None = None) -> Figure:
    """Stacked bars, one per variant: mean seconds per stage over its runs (all cases).

    `total`: the column (seconds when it ends in `_s`, else ms) of the figure a headline gives for the
    same runs; its mean tops the bar, the time llama.cpp's timers do not cover stacked as one more
    stage, so that the bar adds up to the headline."""
    runs = with_stages(runs)
    stages = [(c, label) for c, label in STAGES if c in runs.columns]
    cols = [c for c, _ in stages]
    if total is not None:
        total_ms = runs[total] * (1000.0 if total.endswith("_s") else 1.0)
        runs[OTHER_STAGE[0]] = (total_ms - runs[cols].fillna(0.0).sum(axis=1)).clip(lower=0.0)
        stages.append(OTHER_STAGE)
        cols.append(OTHER_STAGE[0])
    means = runs.groupby("variant")[cols].mean().reindex(precision_order(runs["variant"])).fillna(0.0) / 1000.0
    hot = loaded_variants(runs)
    names = [load.mark(str(v), v in hot, "\n") for v in means.index]
    fig = PlotFigure(figsize=(max(5.0, 1.1 * len(means) + 3), 4.2))
    ax = fig.add_subplot()
    bottom = np.zeros(len(means))
    for col, label in stages:
        ax.bar(names, means[col].to_numpy(), bottom=bottom, label=label, color=STAGE_COLORS.get(col),
               edgecolor="#636363", linewidth=0.5, hatch=[load.HATCH if v in hot else "" for v in means.index])
        bottom += means[col].to_numpy()
    for x, height in enumerate(bottom):
        ax.annotate(format_seconds(height), (x, height), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds (mean over cases)")
    ax.set_title("Latency per answer by stage")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.12)
    save(fig, run, "latency_breakdown")
    return fig


def loaded_variants(runs: pd.DataFrame, key: str = "variant") -> set:
    """The variants (or configurations) of which at least one run was under load."""
    if "under_load" not in runs and "runs_under_load" not in runs:
        return set()
    return {v for v, row in zip(runs[key], runs.to_dict("records")) if load.loaded(row)}


def token_latency(tokens: pd.DataFrame, run: Run | None = None) -> Figure:
    """Inter-token latency over the answer (mean over cases per position) and its histogram.

    `tokens` is the long table of `evaluation_report.token_table`: variant, case, token, itl_ms.
    """
    fig = PlotFigure(figsize=(11, 4))
    ax_line, ax_hist = fig.subplots(1, 2)
    data = tokens.dropna(subset=["itl_ms"])
    order = precision_order(data["variant"]) if len(data) else []
    upper = float(np.percentile(data["itl_ms"], 99)) if len(data) else 1.0
    bins = np.linspace(0.0, max(upper, 1e-3) * 1.05, 40)
    hot = loaded_variants(data)
    for name in order:
        part = data[data["variant"] == name]
        per_pos = part.groupby("token")["itl_ms"].mean()
        color, label = config_color(name), load.mark(str(name), name in hot)
        ax_line.plot(per_pos.index, per_pos.to_numpy(), marker=".", label=label, color=color)
        ax_hist.hist(part["itl_ms"].clip(upper=bins[-1]), bins=bins, histtype="step", linewidth=1.5, label=label,
                     color=color)
    ax_line.set_xlabel("generated token (n-th inter-token gap)")
    ax_line.set_ylabel("ms")
    ax_line.set_title("Inter-token latency over the answer")
    ax_hist.set_xlabel("ms (clipped at the 99th percentile)")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title("Inter-token latency histogram")
    for ax in (ax_line, ax_hist):
        if order:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, run, "token_latency")
    return fig


def size_kld_speed(table: pd.DataFrame, run: Run | None = None, speed: str = "eval_tokens_per_s") -> Figure:
    """Each variant at (file size, mean KLD), coloured and sized by generation speed."""
    fig = PlotFigure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    data = table.dropna(subset=["size_mib"]).copy()
    has_kld = data["kld"].notna() if "kld" in data else pd.Series(False, index=data.index)
    kld = data["kld"].where(has_kld, 0.0) if "kld" in data else pd.Series(0.0, index=data.index)
    spd = data[speed] if speed in data else pd.Series(np.nan, index=data.index)
    finite = spd.dropna()
    sizes = 60 + 240 * ((spd - finite.min()) / (finite.max() - finite.min() or 1.0)).fillna(0.0)
    sc = ax.scatter(data["size_mib"], kld, c=spd.fillna(finite.min() if len(finite) else 0.0), s=sizes,
                    cmap="viridis", edgecolors="black", linewidths=0.5)
    for (_, row), k, ok in zip(data.iterrows(), kld, has_kld):
        ax.annotate(load.mark(str(row["variant"]) + ("" if ok else " (no KLD)"), load.loaded(row)), (row["size_mib"], k),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    positive = kld[kld > 0]
    # KLD spans decades and the reference sits at exactly 0: linear near 0, logarithmic above.
    ax.set_yscale("symlog", linthresh=float(positive.min()) if len(positive) else 1e-4)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence vs reference")
    ax.set_title("Size vs KLD (colour, size: generation tokens/s)")
    if len(finite):
        fig.colorbar(sc, ax=ax, label="generation tokens/s")
    ax.margins(0.15)
    save(fig, run, "size_kld_speed")
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (latency, quality loss), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(points: pd.DataFrame, baseline: str | None = None, run: Run | None = None,
                name: str = "tune_pareto") -> Figure:
    """Answer time against quality loss, one point per configuration, and the Pareto front.

    `points`: config, answer_s, answer_min_s, answer_max_s, kld (NaN or None: not measured, drawn
    at 0 like the reference) and budget (one marker per budget). Time is on a log axis: the seed's
    command can be 10x slower than the rest, which a linear axis squashes into a corner. The front
    is a staircase to the plot's edges (a single point still shows it), over the points it bounds;
    the region it dominates is shaded."""
    data = points.reset_index(drop=True)
    loss = data["kld"].astype(float).fillna(0.0).to_numpy() if "kld" in data else np.zeros(len(data))
    t = data["answer_s"].astype(float).to_numpy()
    lo = data.get("answer_min_s", data["answer_s"]).astype(float).to_numpy()
    hi = data.get("answer_max_s", data["answer_s"]).astype(float).to_numpy()
    fig = PlotFigure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    groups = data["budget"] if "budget" in data else pd.Series(["all"] * len(data))
    for marker, budget in zip("osD^v<>", dict.fromkeys(groups)):
        idx = np.flatnonzero((groups == budget).to_numpy())
        for i in idx:
            ax.errorbar([t[i]], [loss[i]], xerr=[[max(t[i] - lo[i], 0.0)], [max(hi[i] - t[i], 0.0)]], fmt=marker, ms=8,
                        color=config_color(data["config"][i]), mec="black", mew=0.6, capsize=3, zorder=3,
                        label=f"budget {budget}" if i == idx[0] else None)
    hot = [i for i, row in enumerate(data.to_dict("records")) if load.loaded(row)]
    if hot:  # one legend entry, not a label per point (close points would overprint it)
        ax.scatter(t[hot], loss[hot], marker="x", s=110, color="#b30000", linewidths=2.0, zorder=6,
                   label=f"{load.MARK} (a run taken while other processes were busy)")
    if baseline is not None and (data["config"] == baseline).any():
        i = int(np.flatnonzero((data["config"] == baseline).to_numpy())[0])
        ax.annotate("seed's command", (t[i], loss[i]), textcoords="offset points", xytext=(8, 8), fontsize=8)
    ax.set_xscale("log")
    positive = loss[loss > 0]
    ax.set_yscale("symlog", linthresh=float(positive.min()) if len(positive) else 1e-4)
    ax.margins(0.15)
    front = pareto_front(list(zip(t, loss)))
    if front:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        fx, fy = [t[front[0]]], [y1]
        for a, b in zip(front, front[1:] + [None]):
            fx += [t[a], t[b] if b is not None else x1]
            fy += [loss[a], loss[a]]
        ax.fill_between(fx, fy, y1, step=None, color="#d9d9d9", alpha=0.5, zorder=1, lw=0,
                        label="dominated by the front")
        ax.plot(fx, fy, color="black", lw=2.2, zorder=4, label="Pareto front")
        ax.scatter(t[front], loss[front], s=220, facecolors="none", edgecolors="black", linewidths=1.8, zorder=5)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xlabel("seconds to a full answer (median, log scale; bar = min..max of the runs)")
    ax.set_ylabel("mean KL divergence of the quant type")
    ax.set_title("Latency vs quality: the Pareto front (colour: quant type)")
    ax.legend(fontsize=8, loc="best")
    save(fig, run, name)
    return fig
