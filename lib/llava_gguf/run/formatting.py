"""How a number is written on every page, log line and script header: significant digits, seconds,
speed ratios and plurals. Pure (no imports of the package), so that any layer may use it;
reports/tables.py re-exports it beside the table helpers."""
from __future__ import annotations

import math


def format_number(value) -> str:
    """A number as a reader takes it in: 3 significant digits, thousands separated from 1,000 on,
    an exponent below 0.001 (never a float's repr: 0.4168775620000146 -> 0.417, 51531.498 -> 51,531)."""
    if value is None:
        return "–"
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 999.5:
        return f"{x:,.0f}"
    if a >= 0.001:
        return f"{x:.{max(0, 2 - math.floor(math.log10(a)))}f}"
    return f"{x:.2e}"


def format_seconds(value) -> str:
    """Seconds to 3 significant digits, below 1 s in ms: '0.417 s' reads as '417 ms'."""
    if value is None or not math.isfinite(float(value)):
        return "–"
    x = float(value)
    return f"{format_number(x * 1000.0)} ms" if abs(x) < 1.0 else f"{format_number(x)} s"


def format_ratio(value) -> str:
    """A speed ratio: '2.44×'."""
    return "–" if value is None or not math.isfinite(float(value)) else f"{format_number(value)}×"


def format_ratio_range(r: dict | None) -> str:
    """A ratio with its range, as tune_published.ratio gives it: '1.37× (1.31–1.42)', or 'n/a'."""
    if not r:
        return "n/a"
    return f"{r['ratio']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 run', '2 runs' (`words` for an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
