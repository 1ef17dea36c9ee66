"""The evaluation plots: latency breakdown, per-token latency, size vs KLD vs speed.

Figures are made with matplotlib's object API (`matplotlib.figure.Figure`), never pyplot: no
global figure state, no GUI backend is touched, so this is safe headless (papermill, CI) and a
notebook still shows the returned Figure inline. Each is also saved as a PNG under
`outputs/<run>/plots/` (written to a temporary name and renamed).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import quant_types
from ..workspace import Run, atomic_path

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


def latency_breakdown(runs: pd.DataFrame, run: Run | None = None) -> Figure:
    """Stacked bars, one per variant: mean seconds per stage over its runs (all cases)."""
    runs = with_stages(runs)
    cols = [c for c, _ in STAGES if c in runs.columns]
    means = runs.groupby("variant")[cols].mean().reindex(precision_order(runs["variant"])).fillna(0.0) / 1000.0
    fig = PlotFigure(figsize=(max(5.0, 1.1 * len(means) + 3), 4.2))
    ax = fig.add_subplot()
    bottom = np.zeros(len(means))
    for col, label in STAGES:
        if col not in means:
            continue
        ax.bar(means.index, means[col].to_numpy(), bottom=bottom, label=label)
        bottom += means[col].to_numpy()
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:.1f} s", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds (mean over cases)")
    ax.set_title("Latency per answer by stage")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.12)
    save(fig, run, "latency_breakdown")
    return fig


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
    for name in order:
        part = data[data["variant"] == name]
        per_pos = part.groupby("token")["itl_ms"].mean()
        ax_line.plot(per_pos.index, per_pos.to_numpy(), marker=".", label=name)
        ax_hist.hist(part["itl_ms"].clip(upper=bins[-1]), bins=bins, histtype="step", linewidth=1.5, label=name)
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
        ax.annotate(str(row["variant"]) + ("" if ok else " (no KLD)"), (row["size_mib"], k),
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
