"""Several runs side by side: one HTML page over run folders (other boards, other llama.cpp builds).

`render_comparison([outputs/o6, outputs/pi5], out)` reads only what each run folder holds (so a
folder copied from a board works anywhere): `machine.json` (the board and the llama.cpp build,
written by step 06), `metrics/summary.json` and `metrics/variants.csv` (step 06), and
`tune/recommended.json` when a tuning step wrote one. The page shows per run the machine, the
model, the variants with their latency breakdown and the chosen configuration, and plots across
runs. Plots go to `<page stem>_files/` beside the page; every link is relative to the page, so
the page and the run folders can move together.

With no run folders, every run under the outputs folder with metrics is compared, into
`outputs/index.html`.
"""
from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import headline, plots
from .summary import format_value
from .tables import format_seconds, plain, plural
from ..run import machine_load as load, winner
from ..run.machine import describe, describe_clusters
from ..run.workspace import atomic_path, outputs_dir

log = logging.getLogger(__name__)

# Stages of one answer from variants.csv (means over cases): column, label. Generation is shown
# per token and as the full n_predict answer so runs with other n_predict stay comparable.
STAGES = [
    ("image_encode_ms", "image encode (CLIP)"),
    ("image_decode_ms", "image decode (LLM prefill)"),
    ("text_prompt_ms", "prompt eval (text)"),
    ("generation_ms", "generation (n_predict - 1 tokens)"),
]
HATCHES = ["", "//", "..", "xx", "\\\\", "oo"]
# (column, label, format) of each run's variant table.
VARIANT_COLUMNS = [
    ("size_mib", "MiB", "{:,.0f}"),
    ("bpw", "bpw", "{:.2f}"),
    ("kld", "mean KLD", "{:.4f}"),
    ("same_top_pct", "same top %", "{:.1f}"),
    ("load_ms", "load ms", "{:,.0f}"),
    ("image_encode_ms", "image encode ms", "{:,.0f}"),
    ("image_decode_ms", "image decode ms", "{:,.0f}"),
    ("text_prompt_ms", "text prompt ms", "{:,.0f}"),
    ("prompt_tokens_per_s", "prompt tok/s", "{:.2f}"),
    ("eval_ms_per_token", "gen ms/token", "{:.1f}"),
    ("eval_tokens_per_s", "gen tok/s", "{:.2f}"),
    ("answer_ms", "answer ms", "{:,.0f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:,.0f}"),
    ("runs_under_load", "runs under load", "{:,.0f}"),
]


class CompareError(ValueError):
    """A run folder cannot be compared; the message names the folder and the fix."""


@dataclass
class RunRecord:
    """What one run folder holds for the comparison."""

    dir: Path
    label: str
    summary: dict
    variants: pd.DataFrame
    machine: dict = field(default_factory=dict)     # machine.json's "machine"
    llama_cpp: dict = field(default_factory=dict)   # machine.json's "llama_cpp", else artifacts.json's
    params: dict = field(default_factory=dict)      # machine.json's "params"
    recommended: dict | None = None                 # tune/recommended.json

    @property
    def chosen(self) -> dict:
        return self.summary.get("chosen") or {}

    @property
    def n_predict(self) -> int:
        return int(self.summary.get("n_predict") or 1)


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompareError(f"{path}: not valid JSON ({err}); rerun the step that wrote it") from None


def load_run(folder: str | Path, label: str | None = None) -> RunRecord:
    """Read a run folder (outputs/<run>/, possibly copied from another machine)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder}: not a folder; pass run folders such as outputs/<run>")
    metrics = folder / "metrics"
    summary, table = _json(metrics / "summary.json"), metrics / "variants.csv"
    if summary is None or not table.is_file():
        raise CompareError(f"{folder}: no evaluation metrics (metrics/summary.json and metrics/variants.csv); "
                           f"run step 06 on it first (`make evaluate PARAMS=<its params file>`)")
    recorded = _json(folder / "machine.json") or {}
    if not recorded:
        log.warning("%s: no machine.json (evaluated before machines were recorded); machine unknown", folder)
    llama_cpp = recorded.get("llama_cpp") or (_json(folder / "artifacts.json") or {}).get("llama_cpp") or {}
    return RunRecord(folder, label or folder.name, summary, pd.read_csv(table), recorded.get("machine") or {},
                     llama_cpp, recorded.get("params") or {}, _json(folder / "tune" / "recommended.json"))


def find_runs(outputs: Path | None = None) -> list[Path]:
    """Run folders under the outputs folder that have evaluation metrics."""
    outputs = outputs or outputs_dir()
    return sorted(p.parent.parent for p in outputs.glob("*/metrics/summary.json"))


def _labels(folders: list[Path]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name (o6/default, pi5/default)."""
    names = [f.resolve().name for f in folders]
    out = []
    for f, name in zip(folders, names):
        out.append(f"{f.resolve().parent.name}/{name}" if names.count(name) > 1 else name)
    return out


# ----------------------------------------------------------------------------- tables
def with_generation(record: RunRecord) -> pd.DataFrame:
    """variants.csv plus `generation_ms` (the n_predict answer's generation) and `text_prompt_ms`."""
    table = plots.with_stages(record.variants)
    if "eval_ms_per_token" in table:
        table["generation_ms"] = table["eval_ms_per_token"] * max(record.n_predict - 1, 0)
    return table


def overview(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: machine, llama.cpp, model and its chosen variant's figures."""
    rows = []
    for r in records:
        c = r.chosen
        model = r.params.get("model") or {}
        rows.append({
            "run": r.label, "machine": describe(r.machine) if r.machine else "not recorded",
            "features": " ".join(r.machine.get("features") or []), "llama_cpp": r.llama_cpp.get("version"),
            "model": model.get("repo") if model.get("source") in ("huggingface", "modelscope") else
            (model.get("path") or model.get("source")),
            "variants": " ".join(map(str, r.variants["variant"])), "chosen": c.get("variant"),
            "chosen_how": r.summary.get("chosen_how"), "recommended": _recommended_text(r.recommended),
            **{k: c.get(k) for k in ("kld", "image_encode_ms", "image_decode_ms", "prompt_tokens_per_s",
                                     "eval_tokens_per_s", "answer_ms")},
        })
    return pd.DataFrame(rows)


def _recommended_text(rec: dict | None) -> str | None:
    """tune/recommended.json in one line: 'Q4_K_M, t 2: 417 ms, 2.44× faster than the seed's command
    (1.02 s)', worded by the one rule (headline.tune_claim)."""
    if not rec:
        return None
    return (f"{rec.get('config')}: {format_seconds(rec.get('answer_s'))}, "
            f"{headline.tune_claim(rec, seed=format_seconds(rec.get('seed_answer_s')))}")


def _recommended_items(rec: dict) -> list[tuple[str, object]]:
    """What the page shows of tune/recommended.json: the figures a reader compares, formatted
    (a figure the file lacks is left out)."""
    main, setup = rec.get("recommended") or {}, rec.get("setup") or {}

    def secs(value):
        return format_seconds(value) if value is not None else None

    spread = (f"{format_seconds(main['answer_min_s'])} .. {format_seconds(main['answer_max_s'])}"
              if main.get("answer_min_s") is not None and main.get("answer_max_s") is not None else None)
    items = [("configuration", rec.get("config")), ("answer (median)", secs(rec.get("answer_s"))),
             ("spread (min..max)", spread), ("seed's command", secs(rec.get("seed_answer_s"))),
             ("against the seed's command", headline.tune_claim(rec)),
             ("load", load.describe(headline.tune_load(rec), headline.threshold(rec))),
             ("measured", f"{plural(int(setup['repetitions']), 'run')} of {setup.get('n_predict')} tokens"
                          if setup.get("repetitions") else None),
             ("flags", " ".join(map(str, main.get("flags") or [])))]
    for budget, b in (rec.get("budgets") or {}).items():
        if budget != main.get("budget"):
            items.append((f"image budget '{budget}'", f"{b.get('config')}: {format_seconds(b.get('answer_s'))} "
                                                      f"({headline.tune_claim(rec, budget)})"))
    return items


# ----------------------------------------------------------------------------- plots
def latency_across_runs(records: list[RunRecord], folder: Path | None = None) -> plots.PlotFigure:
    """Stacked bars, one per (run, variant): seconds per stage of a full answer (load excluded)."""
    bars, labels, hot = [], [], []
    for r in records:
        table = with_generation(r)
        for _, row in table.iterrows():
            bars.append([float(row.get(c, np.nan)) if c in table else np.nan for c, _ in STAGES])
            hot.append(load.loaded(row))
            labels.append(load.mark(f"{r.label}\n{row['variant']}", hot[-1], "\n"))
    data = np.nan_to_num(np.array(bars, dtype=float).reshape(len(bars), len(STAGES))) / 1000.0
    fig = plots.PlotFigure(figsize=(max(6.0, 0.9 * len(bars) + 3), 4.5))
    ax = fig.add_subplot()
    bottom = np.zeros(len(bars))
    for i, (col, label) in enumerate(STAGES):
        ax.bar(range(len(bars)), data[:, i], bottom=bottom, label=label, color=plots.STAGE_COLORS.get(col),
               edgecolor="#636363", linewidth=0.5, hatch=[load.HATCH if h else "" for h in hot])
        bottom += data[:, i]
    for x, total in enumerate(bottom):
        ax.annotate(format_seconds(total), (x, total), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bars)), labels, fontsize=7, rotation=0 if len(bars) < 8 else 45)
    ax.set_ylabel("seconds per answer (mean over cases)")
    ax.set_title("Latency breakdown across runs (model load excluded)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.12)
    plots.save(fig, None, "latency_across_runs", folder)
    return fig


def speed_across_runs(records: list[RunRecord], folder: Path | None = None) -> plots.PlotFigure:
    """Prompt and generation tokens/s per variant, one bar per run (grouped by variant): a bar has its
    variant's colour (plots.config_color), a run its hatch."""
    variants = plots.precision_order([v for r in records for v in r.variants["variant"]])
    fig = plots.PlotFigure(figsize=(max(8.0, 1.4 * len(variants) * max(len(records), 1) / 2 + 4), 4.2))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(records), 1)
    for ax, (col, title) in zip(axes, [("prompt_tokens_per_s", "prompt eval tokens/s (image included)"),
                                       ("eval_tokens_per_s", "generation tokens/s")]):
        for i, r in enumerate(records):
            by_variant = r.variants.set_index("variant")
            values = [float(by_variant[col].get(v, np.nan)) if col in by_variant else np.nan for v in variants]
            x = np.arange(len(variants)) + (i - (len(records) - 1) / 2) * width
            ax.bar(x, np.nan_to_num(values), width=width, label=r.label, color=[plots.config_color(v) for v in variants],
                   hatch=HATCHES[i % len(HATCHES)], edgecolor="black", linewidth=0.5)
            for xi, v, value in zip(x, variants, values):  # a run's variant measured under load: starred
                if v in by_variant.index and load.loaded(by_variant.loc[v]):
                    ax.annotate("*", (xi, np.nan_to_num(value)), ha="center", va="bottom", color="#b30000")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_title(title + (" (*: under load)" if any(load.loaded(row) for r in records
                                                         for _, row in r.variants.iterrows()) else ""))
        ax.set_ylabel("tokens/s")
    if len(records) > 1:  # the runs by hatch; one run needs no legend
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, None, "speed_across_runs", folder)
    return fig


# ----------------------------------------------------------------------------- HTML
def _table_html(df: pd.DataFrame, columns: list[tuple[str, str, str]], first: str = "variant",
                star: str | None = None) -> str:
    cols = [c for c in columns if c[0] in df]
    head = f"<tr><th>{html.escape(first)}</th>" + "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols)
    rows = []
    for _, row in df.iterrows():
        name = str(row[first])
        cells = "".join(f"<td>{_cell(row[c], fmt)}</td>" for c, _, fmt in cols)
        rows.append(f"<tr><td>{html.escape(name)}{' ★' if name == star else ''}</td>{cells}</tr>")
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def _cell(value, fmt: str) -> str:
    return html.escape(value) if isinstance(value, str) else format_value(value, fmt)


def _kv_html(items: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_plain(v))}</td></tr>"
                   for k, v in items if v not in (None, "", [], {}))
    return f"<table>{rows}</table>"


def _plain(value) -> str:
    if isinstance(value, list):
        return " ".join(map(plain, value))
    return plain(value)


def _link(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page.parent.resolve())).as_posix()


def _run_section(r: RunRecord, page: Path) -> str:
    m, b = r.machine, r.llama_cpp
    compiled = ((b.get("system_info") or {}).get("backends") or {})
    machine = _kv_html([
        ("board", m.get("board")), ("CPU", m.get("cpu")), ("cores", m.get("cores")),
        ("usable cores", m.get("usable_cores")), ("clusters", describe_clusters(m)), ("max MHz", m.get("max_mhz")), ("CPU features", m.get("features")),
        ("RAM (MiB)", m.get("ram_mib")), ("OS", m.get("os")), ("kernel", m.get("kernel")), ("arch", m.get("arch")),
        ("llama.cpp", b.get("version") or b.get("error")), ("built with", b.get("built_with")),
        ("build options", b.get("cmake_options")),
        ("compiled features (system_info)", {k: " ".join(f"{f}={v}" for f, v in feats.items())
                                             for k, feats in compiled.items()}),
    ]) if m or b else "<p>machine not recorded (run evaluated before machine.json existed)</p>"
    model = r.params.get("model") or {}
    shape = r.summary.get("model") or {}
    model_html = _kv_html([
        ("source", model.get("source")), ("repo", model.get("repo")), ("path", model.get("path")),
        ("format", model.get("format")), ("text model parameters", shape.get("params")),
        ("layers x width", f"{shape.get('layers')} x {shape.get('width')}" if shape else None),
        ("KLD reference", r.summary.get("reference")), ("KLD budget", r.summary.get("kld_budget")),
        ("cases x n_predict", f"{r.summary.get('cases')} x {r.summary.get('n_predict')}"),
    ])
    c = r.chosen
    fastest = (f"{headline.EVALUATE_LABEL}: {html.escape(str(c.get('variant')))} — "
               f"{html.escape(str(r.summary.get('chosen_how')))}: answer {format_value(c.get('answer_ms'), '{:,.0f}')} ms, "
               f"generation {format_value(c.get('eval_tokens_per_s'), '{:.2f}')} tok/s, KLD "
               f"{format_value(c.get('kld'), '{:.4f}')}; {html.escape(load.describe(r.summary.get('load')))}."
               if c else f"{headline.EVALUATE_LABEL}: none (no timings).")
    if r.recommended:  # the run's one winner; step 06's pick only labelled as such
        best = (f"<p><b>Recommended (step 07, tune/recommended.json): "
                f"{html.escape(headline.tune_headline(r.recommended) or '–')}</b></p>"
                f"{_kv_html(_recommended_items(r.recommended))}<p>{fastest} Not the recommendation.</p>")
    else:
        best = f"<p><b>{fastest}</b></p>"
    report = r.dir / "reports" / "index.html"
    link = f" (<a href='{html.escape(_link(report, page))}'>run report</a>)" if report.exists() else ""
    return f"""<h2 id="{html.escape(r.label)}">{html.escape(r.label)}{link}</h2>
<h3>Machine</h3>{machine}
<h3>Model</h3>{model_html}
<h3>Variants</h3>{_table_html(with_generation(r), VARIANT_COLUMNS, star=c.get('variant'))}
<h3>Best configuration</h3>{best}"""


ALT = {"latency_across_runs": "Latency breakdown across runs: seconds per stage of one answer, per run and variant",
       "speed_across_runs": "Prompt and generation tokens per second, per variant and run"}
OVERVIEW_COLUMNS = [
    ("machine", "machine", "{}"), ("features", "CPU features", "{}"), ("llama_cpp", "llama.cpp", "{}"),
    ("model", "model", "{}"), ("variants", "variants", "{}"), ("chosen", "fastest in evaluate", "{}"),
    ("kld", "KLD", "{:.4f}"), ("image_encode_ms", "image encode ms", "{:,.0f}"),
    ("image_decode_ms", "image decode ms", "{:,.0f}"), ("prompt_tokens_per_s", "prompt tok/s", "{:.2f}"),
    ("eval_tokens_per_s", "gen tok/s", "{:.2f}"), ("answer_ms", "answer ms", "{:,.0f}"),
    ("recommended", "recommended (step 07)", "{}"),
]


def render_comparison(run_dirs: list[str | Path] | None = None, out: str | Path | None = None) -> Path:
    """Write the comparison page; returns its path. No run folders: every run under outputs/."""
    folders = [Path(d) for d in run_dirs] if run_dirs else find_runs()
    if not folders:
        raise CompareError(f"no run folders given and none with metrics under {outputs_dir()}; "
                           "pass folders such as outputs/o6 outputs/pi5")
    out = Path(out) if out else (outputs_dir() / ("index.html" if not run_dirs else "compare.html"))
    records = [load_run(f, label) for f, label in zip(folders, _labels(folders))]
    files = out.parent / f"{out.stem}_files"
    latency_across_runs(records, files)
    speed_across_runs(records, files)
    imgs = "".join(f"<p><img src='{html.escape(_link(files / f'{name}.png', out))}' alt='{html.escape(ALT[name])}' "
                   f"style='max-width:100%'></p>" for name in ("latency_across_runs", "speed_across_runs"))
    table = overview(records)
    nav = " · ".join(f"<a href='#{html.escape(r.label)}'>{html.escape(r.label)}</a>" for r in records)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>llava-gguf: {plural(len(records), 'run')} compared</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}} td,th{{padding:3px 8px;
border-bottom:1px solid #ddd;text-align:left;vertical-align:top}} table{{border-collapse:collapse;font-size:90%}}
td,th,code{{overflow-wrap:anywhere}} img{{max-width:100%;height:auto}}</style>
</head><body>
<h1>{plural(len(records), 'run')} compared</h1>
<p>{nav}</p>
<p>Each run's winner is step 07's recommendation when the run was tuned; otherwise step 06's fastest quant
type, the fastest full answer (image encode + prompt eval + n_predict tokens, load excluded) whose mean KL
divergence stays within the run's budget. Both follow one rule: {html.escape(winner.RULE)}. Tokens/s are
means over the run's cases; runs with other cases or n_predict are not strictly comparable. A variant with
runs taken under load (other processes over the threshold) is marked.</p>
{_table_html(table, OVERVIEW_COLUMNS, first="run")}
<h2>Across runs</h2>{imgs}
{''.join(_run_section(r, out) for r in records)}
</body></html>"""
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("comparison of %s: %s", plural(len(records), "run"), out)
    return out
