"""Rounding of the tables notebooks display: each number to what it means.

`rounded(df)` returns a copy whose float columns are rounded by the first rule of `ROUNDING` that
matches the column's name (lower-cased, whole name). It is for display only: the CSV/JSON
metrics are written from the unrounded frames and keep full precision.

Times, sizes and rates have a fixed useful resolution (0.1 ms, 0.001 MiB, 0.01 tokens/s), so they
are rounded to decimals; errors and divergences (NMSE, KLD, RMS delta-p) span decades, so they keep
significant digits instead (a KLD of 0.000123 must not become 0.0). Integer and text columns,
and float columns no rule names, are left as they are.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..run.formatting import format_number, format_ratio, format_ratio_range, format_seconds, plural

# (column name pattern, "decimals" or "significant", digits); the first whole-name match wins.
ROUNDING: list[tuple[str, str, int]] = [
    (r".*_per_s", "decimals", 2),                      # rates: tokens/s, MiB/s
    (r".*_ms(_per_token)?", "decimals", 1),            # milliseconds (also ms per token)
    (r"(.*_)?(s|seconds)", "decimals", 3),             # seconds: to the millisecond
    (r"(.*_)?mib", "decimals", 3),                     # MiB: ~1 KiB (small tensors stay visible)
    (r"(.*_)?gib", "decimals", 3),                     # GiB: ~1 MiB
    # errors and divergences (also RMS delta-p %, ln PPL ratio): small values must stay visible
    (r".*(nmse|mse|kld|_err|rms_dp|ln_ppl_ratio)(_.*)?", "significant", 3),
    (r".*_pct", "decimals", 1),                        # percentages
    (r"bpw", "decimals", 2),                           # bits per weight
    (r"ppl(_base)?", "decimals", 3),                   # perplexity
    (r"same_answer", "decimals", 2),                   # share of cases
    (r".*tokens", "decimals", 1),                      # means of token counts
]
_COMPILED = [(re.compile(p), how, digits) for p, how, digits in ROUNDING]


def rule_for(column: str) -> tuple[str, int] | None:
    """("decimals" | "significant", digits) for a column name, None when no rule names it."""
    name = str(column).lower()
    for pattern, how, digits in _COMPILED:
        if pattern.fullmatch(name):
            return how, digits
    return None


def round_significant(values: pd.Series, digits: int) -> pd.Series:
    """Each value to `digits` significant digits (0, NaN and inf kept)."""
    x = values.to_numpy(dtype=float)
    finite = np.isfinite(x) & (x != 0)
    out = x.copy()
    scale = digits - 1 - np.floor(np.log10(np.abs(x[finite])))
    out[finite] = np.round(x[finite] * 10.0**scale) / 10.0**scale
    return pd.Series(out, index=values.index, name=values.name)


def rounded(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """A copy of `df` for display, float columns rounded by `ROUNDING` (None stays None)."""
    if df is None:
        return None
    out = df.copy()
    for col in out.columns:
        rule = rule_for(col)
        if rule is None or not pd.api.types.is_float_dtype(out[col]):
            continue
        how, digits = rule
        out[col] = out[col].round(digits) if how == "decimals" else round_significant(out[col], digits)
    return out


def mapping_table(data: dict, key: str = "name", value: str = "value") -> pd.DataFrame:
    """A mapping as a two-column table, nested mappings flattened to 'outer / inner' rows and lists
    joined: what a notebook shows instead of a dict's repr."""
    rows = []

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict) and v:
            for k, inner in v.items():
                walk(f"{prefix} / {k}" if prefix else str(k), inner)
        else:
            rows.append({key: prefix, value: plain(v)})

    walk("", data)
    return pd.DataFrame(rows, columns=[key, value])


def plain(value) -> str:
    """A value as text: numbers by format_number, lists joined, mappings as 'k: v; ...'."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (float, np.floating)):
        return format_number(value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {plain(v)}" for k, v in value.items()) or "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value) or "–"
    return str(value)


def params_table(section) -> pd.DataFrame:
    """A params section (a pydantic model) as a parameter/value table."""
    return mapping_table(section.model_dump(mode="json"), "parameter", "value")


def readable(df: pd.DataFrame) -> pd.DataFrame:
    """A copy whose cells holding lists or mappings are text (plain), not their repr."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and out[col].map(lambda v: isinstance(v, (list, tuple, dict))).any():
            out[col] = out[col].map(lambda v: plain(v) if isinstance(v, (list, tuple, dict)) else v)
    return out
