"""07_tune's tables of the type screen, the coverage, the two baselines and the bound, from recommended.json.

Pure: each function takes the recommended.json dict (`TuneResult.recommended`) and returns what the
notebook shows, so a re-rendered report and the step itself show the same.
"""
from __future__ import annotations

import math

import pandas as pd

from .tables import format_number, format_ratio_range, plural, rounded


def _yes(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return "yes" if value else "no"


def types_table(rec: dict) -> pd.DataFrame:
    """One row per quant type: llama-bench rates (the best repetition at the best thread count),
    repacked (load log) vs expected (table), KLD without and with the importance matrix, status."""
    rows = []
    for t in (rec.get("types") or {}).get("types") or []:
        repacked = _yes(t.get("repacked"))
        if t.get("repacked") and t.get("layouts"):
            repacked += f" ({t['layouts']})"
        rows.append({
            "quant": t["quant"], "bpw": t.get("bpw"),
            f"prefill {t.get('pp_test') or 'pp'} tokens_per_s": t.get("pp_tokens_per_s"),
            "prefill threads": t.get("pp_threads"),
            f"generation {t.get('tg_test') or 'tg'} tokens_per_s": t.get("tg_tokens_per_s"),
            "generation threads": t.get("tg_threads"),
            "repacked (load log)": repacked, "repack_MiB": t.get("repack_MiB"),
            "expected (repack table)": (_yes(t.get("repacked_expected"))
                                        + (f" ({t['layout_expected']})" if t.get("layout_expected") else "")),
            "kld": t.get("kld"), "kld_no_imatrix": t.get("kld_plain"), "kld_imatrix": t.get("kld_imatrix"),
            "file": t.get("source"), "imatrix": _yes(t.get("imatrix")) if t.get("imatrix") is not None else "",
            "screen": t.get("status") if t.get("status") == "kept" else f"out: {t.get('reason')}"})
    df = pd.DataFrame(rows)
    # One column per test name would split a table whose types ran the same tests: merge them.
    for prefix in ("prefill", "generation"):
        cols = [c for c in df if c.startswith(prefix + " ") and c.endswith("tokens_per_s")]
        if len(cols) > 1:
            df[cols[0]] = df[cols].bfill(axis=1).iloc[:, 0]
            df = df.drop(columns=cols[1:])
    return rounded(df)


def coverage_table(rec: dict) -> pd.DataFrame:
    """Quant type x image budget: the screened answer time (projected to the full length), or why none."""
    cov = pd.DataFrame(rec.get("coverage") or [])
    if cov.empty:
        return cov
    # A reason up to its first colon ("dominated by IQ4_NL"): the types table has the whole of it.
    cov["cell"] = [f"{a:.2f} s" if a is not None and not (isinstance(a, float) and math.isnan(a))
                   else f"— {str(w).split(':')[0]}" for a, w in zip(cov["answer_s"], cov["why_not"])]
    order = list(dict.fromkeys(cov["quant"]))
    budgets = list(dict.fromkeys(cov["budget"]))
    return cov.pivot(index="quant", columns="budget", values="cell").loc[order, budgets].rename_axis(
        index="quant type", columns="image budget")


def _range(d: dict) -> str:
    if not d or d.get("answer_s") is None:
        return "—"
    return f"{d['answer_s']:.2f} s ({d['answer_min_s']:.2f}–{d['answer_max_s']:.2f}, {plural(int(d.get('runs') or 0), 'run')})"


def baselines_table(rec: dict) -> pd.DataFrame:
    """The published recipe, the seed's command on this build, and each budget's recommendation with
    both ratios (medians; the range is the least and the most the ratio can be given every run)."""
    pub, base = rec.get("published") or {}, rec.get("baseline") or {}
    ratios = pub.get("ratios") or {}
    pub_col, base_col = "faster than the published recipe", "faster than the seed's command on this build"
    rows = [{"what": "the published recipe", "configuration": pub.get("description") or "the seed's command on unpatched llama.cpp",
             "answer": _range(pub) if pub.get("measured") else (pub.get("why_not") or "not measured"),
             "image tokens": pub.get("image_tokens"), pub_col: "—", base_col: "—"},
            {"what": "the seed's command, this build", "configuration": base.get("config"), "answer": _range(base),
             "image tokens": base.get("image_tokens"),
             pub_col: format_ratio_range(pub.get("same_build_vs_published")), base_col: "—"}]
    for b, v in (rec.get("budgets") or {}).items():
        r = ratios.get(b) or {}
        rows.append({"what": f"recommended, budget {b}", "configuration": v.get("config"), "answer": _range(v),
                     "image tokens": v.get("image_tokens"), pub_col: format_ratio_range(r.get("vs_published")),
                     base_col: format_ratio_range(r.get("vs_same_build"))})
    return pd.DataFrame(rows)


def bound_lines(rec: dict) -> list[str]:
    """Per budget: 'prefill at N% of this CPU's ceiling', 'generation at M% of memory bandwidth'."""
    out = []
    for b, v in (rec.get("bound") or {}).items():
        out.append(f"**{b}** ({v.get('config')}): {v['prefill']['text']}; {v['generation']['text']}")
    bw = next((v.get("bandwidth") for v in (rec.get("bound") or {}).values() if v.get("bandwidth")), None)
    if bw:
        out.append(f"copy bandwidth: {format_number(bw['GB_per_s'])} GB/s ({bw['method']})")
    return out
