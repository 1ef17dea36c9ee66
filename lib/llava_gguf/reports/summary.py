"""The evaluation summary of a run's index.html: step 06's pick, labelled "fastest quant type in
evaluate" (the run's one headline winner is step 07's recommendation when it ran: headline.py).

It names the fastest variant whose mean KL divergence from the reference stays within
`evaluate.kld_budget`, by winner.py's rule (medians of the runs, one per case; a variant within the
spread of the fastest is not called slower), with a small per-variant table. When the evaluated text model has the real
LLaVA 1.6 Vicuna 7B shape (32 layers of width 4096, ~6.7 B parameters; recognised from the GGUF,
not from the run's name), the seed's numbers from the reference board are shown beside it.
"""
from __future__ import annotations

import html
import json
import logging
import math

import pandas as pd

from .headline import EVALUATE_LABEL
from .tables import plural
from ..run import machine_load as load, winner
from ..run.workspace import Run, json_safe

log = logging.getLogger(__name__)

# The numbers this project started from: llama-mtmd-cli on a Radxa Orion O6 (CPU), the real model
# quantized to Q5_K_M, one image (5 anyres slices -> 2880 image tokens, flat: a build without
# patch 0002; LLaVA 1.6 itself uses 2340) and a short prompt.
# "prompt eval" is llama.cpp's figure, which includes the image encode and the two image batch decodes.
SEED = {
    "board": "Radxa O6",
    "variant": "Q5_K_M",
    "image_encode_ms": 9964.0,
    "image_decode_ms": 177913.0 + 92931.0,
    "image_batches_ms": [177913.0, 92931.0],
    "prompt_eval_ms": 282489.0,
    "prompt_tokens": 2896,
    "prompt_tokens_per_s": 10.25,
    "text_prompt_ms": 282489.0 - (177913.0 + 92931.0) - 9964.0,
    "eval_ms_per_token": 218.0,
    "eval_tokens_per_s": 4.58,
}
# Shape of the real text model (Llama-2 7B / Vicuna 7B).
REAL_SHAPE = {"layers": 32, "width": 4096, "params_min": 6.5e9, "params_max": 7.0e9}

# (column, label, format) of the summary table, one line per figure, one column per variant.
ROWS = [
    ("size_mib", "file size (MiB)", "{:,.0f}"),
    ("bpw", "bits per weight", "{:.2f}"),
    ("kld", "mean KLD vs reference", "{:.4f}"),
    ("same_top_pct", "same top token (%)", "{:.1f}"),
    ("same_answer", "same answer as reference (share of cases)", "{:.0%}"),
    ("load_ms", "model load (ms)", "{:,.0f}"),
    ("image_encode_ms", "image encode (ms)", "{:,.0f}"),
    ("image_decode_ms", "image decode (ms)", "{:,.0f}"),
    ("text_prompt_ms", "text prompt eval (ms)", "{:,.0f}"),
    ("prompt_eval_ms", "prompt eval incl. image decode (ms)", "{:,.0f}"),
    ("prompt_tokens", "prompt tokens", "{:,.0f}"),
    ("image_tokens", "image tokens used", "{:,.0f}"),
    ("image_tokens_llava", "image tokens LLaVA 1.6 uses", "{:,.0f}"),
    ("prompt_tokens_per_s", "prompt tokens/s", "{:.2f}"),
    ("eval_ms_per_token", "generation ms/token", "{:.1f}"),
    ("eval_tokens_per_s", "generation tokens/s", "{:.2f}"),
    ("ttft_ms", "time to first token incl. load (ms)", "{:,.0f}"),
    ("answer_ms", "full answer excl. load (ms)", "{:,.0f}"),
    ("peak_rss_mib", "peak RSS (MiB)", "{:,.0f}"),
    ("runs_under_load", "runs under load (other processes over the threshold)", "{:,.0f}"),
]


def is_real_model(quant: pd.DataFrame) -> bool:
    """True when the evaluated text GGUFs have the real 7B shape (any row of a quant_table)."""
    if quant is None or quant.empty or not {"layers", "width", "params"} <= set(quant.columns):
        return False
    s = REAL_SHAPE
    return bool(((quant["layers"] == s["layers"]) & (quant["width"] == s["width"])
                 & quant["params"].between(s["params_min"], s["params_max"])).any())


def _fastest(table: pd.DataFrame) -> tuple[pd.Series, str]:
    """winner.pick over a variant table's rows: (the row, how in words)."""
    def sample(r):
        return winner.Sample.summary(r.get("answer_ms_median", r["answer_ms"]), r.get("answer_ms_min"),
                                     r.get("answer_ms_max"), r.get("runs", 1))
    rows = {str(r["variant"]): r for _, r in table.iterrows()}
    chosen = winner.pick({v: sample(r) for v, r in rows.items()})
    return rows[chosen.name], chosen.how()


def choose_variant(table: pd.DataFrame, budget: float) -> tuple[dict | None, list[str], str]:
    """(fastest row within the KLD budget by winner.pick, names within it, how it was chosen)."""
    if table.empty or table["answer_ms"].isna().all():
        return None, [], "no timings"
    timed = table.dropna(subset=["answer_ms"])
    if "kld" not in timed or timed["kld"].isna().all():
        best, how = _fastest(timed)
        return json_safe(best.to_dict()), list(timed["variant"]), f"fastest overall, no KLD measured ({how})"
    within = timed[timed["kld"] <= budget]
    if within.empty:
        best = timed.loc[timed["kld"].idxmin()]
        return json_safe(best.to_dict()), [], f"no variant within KLD {budget}; the closest one"
    best, how = _fastest(within)
    return json_safe(best.to_dict()), list(within["variant"]), f"fastest with mean KLD <= {budget} ({how})"


def build_summary(run: Run, table: pd.DataFrame, quant: pd.DataFrame, reference: str | None,
                  notes: list[str], runs: pd.DataFrame | None = None) -> dict:
    """What metrics/summary.json holds (and summary_html shows); `runs`: the load they ran under."""
    budget = run.params.evaluate.kld_budget
    best, within, how = choose_variant(table, budget)
    real = is_real_model(quant)
    model = quant.iloc[0][["params", "layers", "width"]].to_dict() if len(quant) else {}
    return json_safe({
        "run": run.params.run, "kld_budget": budget, "reference": reference, "chosen": best,
        "within_budget": within, "chosen_how": how, "real_model": real,
        "model": model, "seed": SEED if real else None, "notes": notes,
        "n_predict": run.params.evaluate.n_predict, "cases": len(run.params.evaluate.cases),
        "perplexity_ctx": run.params.evaluate.perplexity_ctx,
        "perplexity_chunks": run.params.evaluate.perplexity_chunks,
        "load": load.summarize(runs.to_dict("records")) if runs is not None else None,
        "load_threshold": run.params.evaluate.load_threshold,
    })


# ----------------------------------------------------------------------------- HTML
def format_value(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return html.escape(str(value))


def summary_html(run: Run) -> str | None:
    """The summary block for index.html, None when the run has no evaluation metrics yet."""
    folder = run.resolve(run.artifacts().get("metrics") or run.dir / "metrics")
    summary_file, table_file = folder / "summary.json", folder / "variants.csv"
    if not summary_file.exists() or not table_file.exists():
        return None
    info = json.loads(summary_file.read_text())
    table = pd.read_csv(table_file)
    chosen = info.get("chosen") or {}
    name = chosen.get("variant")
    seed = info.get("seed")
    head = [f"<th>{html.escape(str(v))}{' ★' if v == name else ''}</th>" for v in table["variant"]]
    if seed:
        head.append(f"<th>seed: {html.escape(seed['board'])}, {html.escape(seed['variant'])}</th>")
    rows = []
    for col, label, fmt in ROWS:
        if col not in table and not (seed and col in seed):
            continue
        cells = [format_value(v, fmt) for v in (table[col] if col in table else [None] * len(table))]
        if seed:
            cells.append(format_value(seed.get(col), fmt))
        rows.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if name:
        headline = (f"<b>{EVALUATE_LABEL}: {html.escape(name)}</b> — {html.escape(info.get('chosen_how', ''))}: full answer "
                    f"{format_value(chosen.get('answer_ms'), '{:,.0f}')} ms excl. load, generation "
                    f"{format_value(chosen.get('eval_tokens_per_s'), '{:.2f}')} tokens/s, prompt "
                    f"{format_value(chosen.get('prompt_tokens_per_s'), '{:.2f}')} tokens/s, mean KLD "
                    f"{format_value(chosen.get('kld'), '{:.4f}')}, {format_value(chosen.get('size_mib'), '{:,.0f}')} MiB; "
                    + html.escape(load.describe(info.get("load"), load.threshold_of(info)))
                    + ".")
        if (run.dir / "tune" / "recommended.json").exists():
            headline += ("<br><small>Not the run's recommendation: that is step 07's, in the headline at the top "
                         "of this page, measured with repetitions against the seed's command.</small>")
    else:
        headline = "No variant could be chosen (no timings)."
    model = info.get("model") or {}
    which = ("the real 7B shape: the seed's board numbers are shown beside it" if info.get("real_model")
             else "not the real 7B shape (a synthetic or other model): the seed's Radxa O6 figures are not shown")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in info.get("notes") or [])
    plot = folder.parent / "plots" / "latency_breakdown.png"
    img = (f"<p><img src='../plots/{plot.name}' alt='latency breakdown' style='max-width:100%'></p>"
           if plot.exists() else "")
    return f"""<h2>Evaluation summary</h2>
<p>{headline}</p>
<p>Reference: {html.escape(str(info.get('reference')))}; KLD budget {info.get('kld_budget')}; text model
{format_value(model.get('params'), '{:,.0f}')} parameters, {model.get('layers')} layers of width {model.get('width')}
({which}). Means over {plural(int(info.get('cases') or 0), 'case')}, {info.get('n_predict')} tokens requested.</p>
<table><tr><th>★ {EVALUATE_LABEL.lower()}</th>{''.join(head)}</tr>{''.join(rows)}</table>
{f'<ul>{notes}</ul>' if notes else ''}{img}"""
